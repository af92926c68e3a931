"""The ``evaluate`` flow: a run's dataset figures, recorded, published and compared.

Meant to run on a schedule (``deploy/prefect.yaml``): each run evaluates a segmentation run
(or a slice of it) from its Parquet alone, writes the figures next to the run, publishes them
as a Prefect table artifact, and compares them with what the previous run of the same
deployment published (the artifact's previous version), flagging every figure that dropped
by more than ``regression_threshold`` — and failing when ``fail_on_regression`` asks it to.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client

from segflow.errors import SegflowError
from segflow.evaluation import check_where, evaluate_run, headline_figures, open_run


class RegressionError(SegflowError, RuntimeError):
    """Figures dropped by more than the threshold since the previous evaluation."""


@task(cache_policy=NONE, retries=1, retry_delay_seconds=10)
def compute(run: str, where: str | None) -> dict[str, Any]:
    return evaluate_run(run, where=where, latest=True)


@task(cache_policy=NONE)
def record(result: dict[str, Any]) -> str:
    """Write ``evaluations/<UTC time>/summary.json`` and ``figures.parquet`` into the run."""
    store = open_run(result["run"]).store
    folder = f"evaluations/{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"
    store.write_json(f"{folder}/summary.json", result)
    figures = headline_figures(result)
    store.write_parquet(
        f"{folder}/figures.parquet",
        pa.table({"figure": list(figures), "value": list(figures.values())}),
    )
    return store.fs.unstrip_protocol(store.path(folder))


def artifact_key(run: str, where: str | None) -> str:
    """One history per deployment; an ad-hoc evaluation has one per run and slice."""
    deployment = runtime.deployment.name
    if deployment:
        name = f"evaluate-{deployment}"
    else:
        digest = hashlib.sha256(f"{run}\n{where}".encode()).hexdigest()[:12]
        name = f"evaluate-adhoc-{digest}"
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


def previous_figures(key: str) -> dict[str, float | None] | None:
    """The figures the latest artifact under ``key`` holds, if any."""
    with get_client(sync_client=True) as client:
        # The body is spelled out: 3.8.8's read_artifacts sends nulls its server rejects.
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {"key": {"any_": [key]}},
                "sort": "CREATED_DESC",
                "limit": 1,
                "offset": 0,
            },
        )
        response.raise_for_status()
    artifacts = response.json()
    if not artifacts:
        return None
    rows = json.loads(artifacts[0]["data"])
    return {row["figure"]: row["value"] for row in rows}


def compare(
    figures: dict[str, float | None],
    previous: dict[str, float | None] | None,
    threshold: float,
) -> list[dict[str, Any]]:
    """One row per figure: its value, the previous one, the change, and whether it dropped
    by more than ``threshold`` (every figure here is better when higher)."""
    rows = []
    for figure, value in figures.items():
        before = (previous or {}).get(figure)
        change = None if value is None or before is None else value - before
        rows.append(
            {
                "figure": figure,
                "value": value,
                "previous": before,
                "change": change,
                "regression": change is not None and -change > threshold,
            }
        )
    return rows


@flow(name="evaluate", log_prints=True)
def evaluate(
    run: str,
    where: str | None = None,
    regression_threshold: float = 0.01,
    fail_on_regression: bool = False,
) -> dict[str, Any]:
    """Evaluate ``run`` (``OUT/run=<id>``, or ``OUT``: the run in it that finished last),
    optionally only the images an SQL predicate ``where`` over its ``images`` table selects
    (one expression, checked as ``segflow evaluate --where`` checks it)."""
    if where:
        check_where(where)  # refused before anything is read, and not retried as compute is
    logger = get_run_logger()
    result = compute(run, where)
    location = record(result)
    key = artifact_key(run, where)
    rows = compare(headline_figures(result), previous_figures(key), regression_threshold)
    create_table_artifact(
        table=rows,
        key=key,
        description=f"segflow evaluation of {result['run']}" + (f" where {where}" if where else ""),
    )
    regressions = [row for row in rows if row["regression"]]
    for row in rows:
        logger.info("%s = %s (previous %s)", row["figure"], row["value"], row["previous"])
    logger.info("figures written to %s", location)
    result["figures_location"] = location
    result["regressions"] = [row["figure"] for row in regressions]
    if regressions and fail_on_regression:
        described = ", ".join(
            f"{r['figure']} {r['previous']:.4f} -> {r['value']:.4f}" for r in regressions
        )
        raise RegressionError(f"dropped by more than {regression_threshold}: {described}")
    return result
