"""Models of the user's own: ``--model module.path:callable`` and the ``segflow.models``
entry-point group; what cannot be imported or is not a model fails before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from typer.testing import CliRunner

from segflow.cli import app
from segflow.decode import decode_image
from segflow.job import Job, JobError
from segflow.models import available_models, load_model
from segflow.models.user import ENTRY_POINT_GROUP, UserModelError
from segflow.preflight import ModelLoadError, check_job
from tests.conftest import REPO_ROOT
from tests.user_models import BrightnessModel, brightness_labels

FACTORY = "tests.user_models:make_brightness_model"


def test_a_factory_is_called_with_the_device_and_the_model_options():
    model = load_model(FACTORY, device="cpu", threshold=7)
    assert isinstance(model, BrightnessModel)
    assert (model.device, model.threshold) == (torch.device("cpu"), 7)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.models:make", "no module named 'no_such_package'"),
        ("tests.user_models:no_such_factory", "module 'tests.user_models' has no"),
        ("tests.user_models:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        ("tests.user_models:make_incomplete", "returned a Incomplete without classes, predict"),
        ("tests.user_models:make_wrong_task", "task must be 'semantic' or 'instance'"),
    ],
)
def test_a_factory_that_cannot_give_a_model_is_an_error_naming_it(spec, message):
    with pytest.raises(UserModelError) as raised:
        load_model(spec, device="cpu")
    assert f"model {spec!r}" in str(raised.value)
    assert message in str(raised.value)


def test_the_cli_stops_before_any_work_on_a_bad_factory(tmp_path):
    out = tmp_path / "out"
    spec = "tests.user_models:no_such_factory"
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--model", spec, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"model {spec!r}: module 'tests.user_models' has no" in " ".join(result.output.split())
    assert not out.exists()


def test_segflow_options_of_registered_models_do_not_apply_to_a_user_model(tmp_path):
    for settings, flag in (
        ({"score_threshold": 0.5}, "--score-threshold"),
        ({"precision": "bf16"}, "--precision"),
        ({"tile_size": 256}, "--tile-size"),
    ):
        with pytest.raises(JobError, match=f"{flag} does not apply to the user model"):
            check_job(Job(input=str(tmp_path), model=FACTORY, out=str(tmp_path / "o"), **settings))
    checked = check_job(
        Job(
            input=str(tmp_path),
            model=FACTORY,
            out=str(tmp_path / "o"),
            batch_size=3,
            model_options={"threshold": 9},
        )
    )
    assert checked.job.model_sha256 is None
    assert checked.config["model_options"] == {"threshold": 9}
    unknown = Job(
        input=str(tmp_path), model=FACTORY, out=str(tmp_path / "o"), model_options={"depth": 3}
    )
    with pytest.raises(ModelLoadError, match="unexpected keyword argument 'depth'"):
        check_job(unknown)


@pytest.fixture
def registered(tmp_path, monkeypatch) -> Path:
    """A distribution on sys.path that registers ``toy`` under the entry-point group."""
    dist = tmp_path / "site" / "segflow_toy_models-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: segflow-toy-models\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = {FACTORY}\n")
    monkeypatch.syspath_prepend(str(dist.parent))
    return dist.parent


def test_a_package_registers_models_by_entry_point(registered):
    [toy] = [info for info in available_models() if info.name == "toy"]
    assert (toy.task, toy.loader) == (None, FACTORY)
    assert toy.source == "entry point (segflow-toy-models)"
    model = load_model("toy", device="cpu", threshold=3)
    assert isinstance(model, BrightnessModel) and model.threshold == 3

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(registered), str(REPO_ROOT)])}
    listed = subprocess.run(
        [sys.executable, "-m", "segflow.cli", "models", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO_ROOT,
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["toy"]["source"] == "entry point (segflow-toy-models)"
    assert "lraspp_mobilenet_v3_large" in rows


@pytest.mark.slow
@pytest.mark.integration
def test_a_user_model_runs_through_the_cli_on_ray(frames, tmp_path):
    from tests.test_segment_flow import Cli, make_corpus

    corpus = make_corpus(tmp_path / "in", frames, good=3, bad=False)
    out = tmp_path / "out"
    args = [str(corpus), "--model", FACTORY, "--model-option", "threshold=90", "--out", str(out)]
    args += ["--run-id", "u", "--batch-size", "16", "--prefetch-threads", "2"]
    args += ["--cpus-per-actor", "1", "--shard-size", "2"]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    returncode, output = Cli(*args, log=tmp_path / "cli.log", env=env).wait()
    assert returncode == 0, output
    run = out / "run=u"
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["model"] == FACTORY
    assert recorded["model_options"] == {"threshold": 90}
    con = duckdb.connect()
    images = con.execute(f"SELECT uri, height, width FROM '{run}/images/*.parquet'").fetchall()
    assert len(images) == 3
    # What landed decodes to the user model's labels, for every image.
    for uri, height, width in images:
        with fsspec.open(uri, "rb") as f:
            expected = brightness_labels(decode_image(f.read()), 90).numpy()
        rebuilt = np.full((height, width), -1)
        for class_id, counts in con.execute(
            f"SELECT class_id, counts FROM '{run}/masks/*.parquet' WHERE uri = ?", [uri]
        ).fetchall():
            rebuilt[coco_mask.decode({"size": [height, width], "counts": counts}) == 1] = class_id
        np.testing.assert_array_equal(rebuilt, expected)
