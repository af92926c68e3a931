"""bench/gpu_check.py's dry mode: the script a GPU machine will run, on the CPU, so that it
has not rotted by the day a GPU is lent (same code path, small images)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_dry_on_the_cpu_and_its_rle_checks_hold(tmp_path):
    results = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--dry", "--json", results],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    checked = json.loads(results.read_text())
    assert checked["device"] == "cpu"
    assert checked["rle_device_equals_cpu"] == {
        "deeplabv3_resnet50": True,
        "maskrcnn_resnet50_fpn_v2": True,
        "aerial-unet": True,
    }
    runs = {(run["model"], run["size"]) for run in checked["runs"]}
    assert len(runs) == 6
    assert all(
        run["pipeline_img_s"] > 0 and run["pipeline_gpu_decode_img_s"] > 0
        for run in checked["runs"]
    )
