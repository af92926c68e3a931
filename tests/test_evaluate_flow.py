"""The ``evaluate`` flow on a real Prefect server: figures recorded with the run, a table
artifact, comparison with the previous evaluation, and a cron-scheduled deployment that a
served process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from segflow.evaluation import evaluate_run
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The images whose own mIoU is below the run's median: a slice that is worse than the run.
WORSE_HALF = "miou < (SELECT median(miou) FROM images)"


@pytest.fixture(scope="module")
def semantic_run(prefect_harness, local_ray, shared: Path, tmp_path_factory) -> str:
    from pipelines.segment import segment

    out = str(tmp_path_factory.mktemp("evaluate-flow") / "out")
    summary = segment(
        input=str(shared / "data" / "camvid_val" / "images" / "0016E5_0796*.png"),
        model=str(shared / "models" / "espnet_camvid.pt2"),
        out=out,
        gt=f"masks:{shared / 'data' / 'camvid_val' / 'labels'}",
        ignore_index=11,
        shard_size=4,
    )
    assert summary["images"] == 5 and summary["not_evaluated"] == 0
    return out


def artifacts(key: str) -> list[dict]:
    # The REST API directly: 3.8.8's client sends nulls that its own server rejects.
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 10},
    )
    response.raise_for_status()
    return response.json()


def test_evaluate_records_publishes_and_compares(semantic_run: str):
    from pipelines.evaluate import artifact_key, evaluate

    first = evaluate(run=semantic_run)
    assert first["semantic"] == evaluate_run(semantic_run)["semantic"]
    assert first["regressions"] == []
    location = first["figures_location"]
    assert location.startswith("file://")  # a URI, whatever the store
    with fsspec.open(f"{location}/figures.parquet", "rb") as f:
        figures = pq.read_table(f).to_pylist()
    assert {"figure": "semantic/miou", "value": first["semantic"]["miou"]} in figures
    with fsspec.open(f"{location}/summary.json") as f:
        recorded = json.load(f)
    assert recorded["semantic"]["miou"] == first["semantic"]["miou"]

    second = evaluate(run=semantic_run)
    [latest, previous] = artifacts(artifact_key(semantic_run, None))[:2]
    rows = {row["figure"]: row for row in json.loads(latest["data"])}
    assert rows["semantic/miou"]["previous"] == first["semantic"]["miou"]
    assert rows["semantic/miou"]["change"] == 0.0
    assert second["regressions"] == [] and previous["key"] == latest["key"]


def test_scheduled_deployment_runs_and_flags_a_regression(semantic_run: str, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    full = evaluate_run(semantic_run)["semantic"]["miou"]
    worse = evaluate_run(semantic_run, where=WORSE_HALF)["semantic"]["miou"]
    assert worse < full - 0.001  # the premise of the regression below

    log = tmp_path / "serve.log"
    serve = f"""
from pipelines.evaluate import evaluate
evaluate.serve(name="nightly", cron="0 3 * * *", parameters={{"run": {semantic_run!r}}})
"""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", serve], cwd=REPO_ROOT, env=env, stdout=out, stderr=out
        )
    try:
        deployment = wait_for_deployment("evaluate/nightly", server, log)
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.active

        baseline = run_deployment("evaluate/nightly", timeout=300)
        assert baseline.state.is_completed(), log.read_text()[-3000:]
        regressed = run_deployment(
            "evaluate/nightly",
            parameters={
                "where": WORSE_HALF,
                "fail_on_regression": True,
                "regression": "threshold",
                "regression_threshold": 0.001,
            },
            timeout=300,
        )
        assert regressed.state.is_failed(), log.read_text()[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)

    [latest, before] = artifacts("evaluate-nightly")[:2]
    rows = {row["figure"]: row for row in json.loads(latest["data"])}
    assert rows["semantic/miou"]["value"] == pytest.approx(worse)
    assert rows["semantic/miou"]["previous"] == pytest.approx(full)
    assert rows["semantic/miou"]["regression"] is True
    assert {row["figure"]: row for row in json.loads(before["data"])}["semantic/miou"][
        "value"
    ] == pytest.approx(full)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(regressed.id).state.message  # says why it failed


def test_paired_bootstrap_flags_a_planted_drop_and_not_the_run_itself(prefect_harness, tmp_path):
    """Runs written directly (no Ray): a baseline and the same images with a planted drop."""
    from pipelines.evaluate import RegressionError, artifact_key, evaluate
    from tests.test_bootstrap import population_counts, write_run

    counts = population_counts(np.random.default_rng(4), 300)
    base = write_run(tmp_path / "out", "base", counts)
    counts["intersection"][:, 1] //= 2
    dropped = write_run(tmp_path / "out", "dropped", counts)

    same = evaluate(run=base, baseline=base, bootstrap=200)
    assert same["regressions"] == []
    with pytest.raises(RegressionError, match="beyond the interval"):
        evaluate(run=dropped, baseline=base, bootstrap=200, fail_on_regression=True)
    [latest] = artifacts(artifact_key(dropped, None))[:1]
    rows = {row["figure"]: row for row in json.loads(latest["data"])}
    miou = rows["semantic/miou"]
    assert miou["regression"] is True and miou["compared_images"] == 300
    assert miou["change_low"] <= miou["change"] <= miou["change_high"] < 0
    assert miou["run"].endswith("/out/run=dropped")  # the run's URI

    # No baseline given: the run the previous artifact evaluated, here the same run.
    again = evaluate(run=dropped, bootstrap=200)
    assert again["regressions"] == []
    [latest] = artifacts(artifact_key(dropped, None))[:1]
    rows = {row["figure"]: row for row in json.loads(latest["data"])}
    assert rows["semantic/miou"]["change"] == 0 and rows["semantic/miou"]["change_high"] == 0


def wait_for_deployment(name: str, server: subprocess.Popen, log: Path, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(f"{name} was not registered in {timeout}s:\n{log.read_text()[-3000:]}")
