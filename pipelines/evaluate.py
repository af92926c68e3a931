"""The ``evaluate`` flow: a run's dataset figures, recorded, published and compared.

Meant to run on a schedule (``deploy/prefect.yaml``): each run evaluates a segmentation run
(or a slice of it) from its Parquet alone, writes the figures next to the run, publishes them
as a Prefect table artifact, and compares them with what the previous run of the same
deployment published (the artifact's previous version) — and fails when
``fail_on_regression`` asks it to and a figure dropped:

- ``regression="interval"`` (the default): the evaluated run against a baseline run (``baseline``,
  or else the run the previous artifact evaluated, with its slice), on the images both
  evaluated, by a paired bootstrap (:func:`segflow.bootstrap.compare_runs`): a figure dropped
  when the whole ``ci`` interval of its change is below 0. Each row shows the change and its
  interval (``change_low``, ``change_high``) and the images compared.
- ``regression="threshold"``: a figure dropped when it is lower than the previous artifact's
  by more than ``regression_threshold``.
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

from segflow.bootstrap import Bootstrap, Comparison, compare_runs
from segflow.errors import SegflowError
from segflow.evaluation import (
    EvaluationError,
    check_where,
    evaluate_run,
    headline_figures,
    open_run,
)


class RegressionError(SegflowError, RuntimeError):
    """Figures dropped since the previous evaluation (beyond their interval, or the threshold)."""


@task(cache_policy=NONE, retries=1, retry_delay_seconds=10)
def compute(run: str, where: str | None) -> dict[str, Any]:
    return evaluate_run(run, where=where, latest=True)


@task(cache_policy=NONE)
def paired(
    run: str, where: str | None, baseline: str, baseline_where: str | None, resampling: Bootstrap
) -> Comparison:
    return compare_runs(run, baseline, resampling, where=where, baseline_where=baseline_where)


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


def previous_rows(key: str) -> list[dict[str, Any]] | None:
    """The rows of the latest artifact under ``key``, if any."""
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
    return json.loads(artifacts[0]["data"])


def compare(
    figures: dict[str, float | None],
    previous: list[dict[str, Any]] | None,
    threshold: float,
    comparison: Comparison | None = None,
) -> list[dict[str, Any]]:
    """One row per figure: its value, the previous one, and the change. With a paired
    ``comparison``, the change is the paired one, with its interval, and a regression is an
    interval wholly below 0; without, a drop by more than ``threshold`` (every figure here is
    better when higher)."""
    before_of = {row["figure"]: row["value"] for row in previous or []}
    rows = []
    for figure, value in figures.items():
        before = before_of.get(figure)
        row = {"figure": figure, "value": value, "previous": before}
        paired_change = comparison.changes.get(figure) if comparison else None
        if comparison is None:
            change = None if value is None or before is None else value - before
            row |= {"change": change, "regression": change is not None and -change > threshold}
        else:
            row |= {
                "change": paired_change and paired_change.difference,
                "change_low": paired_change and paired_change.interval.low,
                "change_high": paired_change and paired_change.interval.high,
                "compared_images": comparison.shared_images,
                "regression": bool(paired_change and paired_change.dropped),
            }
        rows.append(row)
    return rows


@flow(name="evaluate", log_prints=True)
def evaluate(
    run: str,
    where: str | None = None,
    regression: str = "interval",
    baseline: str | None = None,
    baseline_where: str | None = None,
    ci: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
    regression_threshold: float = 0.01,
    fail_on_regression: bool = False,
) -> dict[str, Any]:
    """Evaluate ``run`` (``OUT/run=<id>``, or ``OUT``: the run in it that finished last),
    optionally only the images an SQL predicate ``where`` over its ``images`` table selects
    (one expression, checked as ``segflow evaluate --where`` checks it), and compare it (see
    the module's docstring for ``regression`` and the parameters that go with it)."""
    if where:
        check_where(where)  # refused before anything is read, and not retried as compute is
    if baseline_where:
        check_where(baseline_where)
    if regression not in ("interval", "threshold"):
        raise EvaluationError(f"regression must be 'interval' or 'threshold', got {regression!r}")
    resampling = Bootstrap(ci, bootstrap, seed)
    logger = get_run_logger()
    result = compute(run, where)
    location = record(result)
    key = artifact_key(run, where)
    previous = previous_rows(key)
    comparison = None
    if regression == "interval":
        if baseline is None and previous and "run" in previous[0]:
            baseline, baseline_where = previous[0]["run"], previous[0]["where"]
        if baseline is not None:
            comparison = paired(result["run"], where, baseline, baseline_where, resampling)
    rows = compare(headline_figures(result), previous, regression_threshold, comparison)
    # Where the next evaluation finds its baseline.
    rows = [row | {"run": result["run"], "where": where} for row in rows]
    create_table_artifact(
        table=rows,
        key=key,
        description=f"segflow evaluation of {result['run']}" + (f" where {where}" if where else ""),
    )
    regressions = [row for row in rows if row["regression"]]
    for row in rows:
        logger.info("%s = %s (previous %s)", row["figure"], row["value"], row["previous"])
    if comparison is not None:
        logger.info("compared with %s on %d image(s)", baseline, comparison.shared_images)
    logger.info("figures written to %s", location)
    result["figures_location"] = location
    result["regressions"] = [row["figure"] for row in regressions]
    if regressions and fail_on_regression:
        if comparison is None:
            described = ", ".join(
                f"{r['figure']} {r['previous']:.4f} -> {r['value']:.4f}" for r in regressions
            )
            raise RegressionError(f"dropped by more than {regression_threshold}: {described}")
        described = ", ".join(
            f"{r['figure']} by {-r['change']:.4f} ({ci:.0%} interval of the change "
            f"[{r['change_low']:.4f}, {r['change_high']:.4f}])"
            for r in regressions
        )
        raise RegressionError(f"dropped against {baseline} beyond the interval: {described}")
    return result
