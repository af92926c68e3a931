"""Exit statuses that mean one thing each, and bad jobs refused before Ray or Prefect start.

0: every image done; 1: some images failed; 2: the job could not start, nothing written;
3: the job started and could not finish, what was committed stays (segflow.errors).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

import workers.cluster
from segflow import cli
from segflow.store import RunStore
from tests.test_segment_flow import Cli, assert_exactly_once, make_corpus


@pytest.fixture
def nothing_starts(monkeypatch):
    """Record any attempt to start Ray or Prefect's server (the check must come first)."""
    started = []
    monkeypatch.setattr(cli, "_reach_prefect_api", lambda: started.append("prefect"))
    monkeypatch.setattr(workers.cluster, "connect", lambda *a, **k: started.append("ray"))
    return started


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def test_bad_jobs_fail_with_one_line_before_ray_or_prefect_start(
    nothing_starts, shared, frames, tmp_path
):
    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    models = shared / "models"
    espnet = str(models / "espnet_camvid.pt2")
    labels = f"masks:{shared / 'data' / 'camvid_val' / 'labels'}"

    no_card = tmp_path / "no_card.pt2"
    shutil.copy(espnet, no_card)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 this is no zip archive" * 100)
    shutil.copy(models / "espnet_camvid.json", tmp_path / "corrupt.json")

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")

    conflicting = tmp_path / "conflicting"
    (conflicting / "run=c").mkdir(parents=True)
    (conflicting / "run=c" / "run.json").write_text(json.dumps({"model": "another"}))

    cases = {
        "unknown model": (["--model", "no_such_model"], "no_such_model"),
        "missing card": (["--model", str(no_card)], "card"),
        "corrupt model": (["--model", str(corrupt)], "is not a .pt2 archive"),
        "missing input": (["--model", espnet], "does not exist", tmp_path / "nope"),
        "bad ground truth spec": (["--model", espnet, "--gt", "labels:/x"], "KIND:URI"),
        "ground truth folder missing": (
            ["--model", espnet, "--gt", f"masks:{tmp_path / 'no_labels'}"],
            "does not exist",
        ),
        "out is a file": (["--model", espnet, "--out", str(a_file / "out")], "is a file"),
        "another configuration": (
            ["--model", espnet, "--out", str(conflicting), "--run-id", "c"],
            "another configuration",
        ),
        "ignore index 300 in 8-bit labels": (
            ["--model", espnet, "--gt", labels, "--ignore-index", "300"],
            "--ignore-index 300",
        ),
        "negative ignore index": (
            ["--model", espnet, "--gt", labels, "--ignore-index", "-5"],
            "--ignore-index -5",
        ),
        "ignore index without ground truth": (
            ["--model", espnet, "--ignore-index", "11"],
            "give --gt",
        ),
        "an option of another task": (
            ["--model", "maskrcnn_resnet50_fpn", "--tile-size", "512"],
            "--tile-size applies to semantic models only",
        ),
        "fp16 on the cpu": (
            ["--model", espnet, "--device", "cpu", "--precision", "fp16"],
            "--precision fp16 needs a GPU",
        ),
        "a model option segflow sets": (
            ["--model", espnet, "--model-option", "batch_size=4"],
            "--model-option batch_size: set it with --batch-size",
        ),
        "a user model that is not there": (
            ["--model", "tests.user_models:no_such_factory"],
            "module 'tests.user_models' has no 'no_such_factory'",
        ),
    }
    for name, (options, message, *source) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        arguments = ["segment", str(source[0] if source else corpus), "--out", str(out)]
        result = CliRunner().invoke(cli.app, [*arguments, *options])
        assert result.exit_code == 2, (name, result.output)
        assert message in one_error_line(result.output), (name, result.output)
        assert not out.exists(), name
    assert nothing_starts == []
    assert json.loads((conflicting / "run=c" / "run.json").read_text()) == {"model": "another"}
    assert a_file.read_text() == "not a folder"


def test_an_s3_output_whose_bucket_does_not_exist_is_refused_not_created(
    nothing_starts, s3_env, shared, frames, tmp_path, monkeypatch
):
    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    model = str(shared / "models" / "espnet_camvid.pt2")
    arguments = ["segment", str(corpus), "--model", model, "--out", "s3://no-such-bucket/out"]
    try:
        result = CliRunner().invoke(cli.app, arguments)
    finally:
        # The command's s3fs instance is cached with this test's credentials.
        fsspec.filesystem("s3").clear_instance_cache()
    assert result.exit_code == 2, result.output
    assert "bucket 'no-such-bucket' does not exist" in one_error_line(result.output)
    assert "no-such-bucket" not in fs.ls("", refresh=True)
    assert nothing_starts == []


def test_a_job_that_started_and_could_not_finish_exits_3_and_resumes(shared, frames, tmp_path):
    """A store that breaks mid-run (here: the masks table's folder replaced by a file once a
    shard is committed) ends the command with status 3 and one line; what was committed stays and
    the same command, rerun, finishes every image exactly once."""
    corpus = make_corpus(tmp_path / "in", frames, good=8, bad=False)
    out = tmp_path / "out"
    args = [str(corpus), "--model", str(shared / "models" / "espnet_camvid.pt2")]
    args += ["--out", str(out), "--shard-size", "1", "--run-id", "broken"]
    run = out / "run=broken"
    first = Cli(*args, log=tmp_path / "first.log")

    store = RunStore(str(out), "broken")

    def break_the_store() -> None:
        while not (run / "run.json").exists() and first.process.poll() is None:
            time.sleep(0.05)
        while not store.committed() and first.process.poll() is None:
            time.sleep(0.05)
        (run / "masks").rename(run / "masks.saved")
        (run / "masks").write_text("in the way")

    breaker = threading.Thread(target=break_the_store)
    breaker.start()
    returncode, output = first.wait()
    breaker.join()
    assert returncode == 3, output
    assert "committed shards are kept" in output
    one_error_line(output)
    committed = len(store.committed())
    assert 1 <= committed < 8, output

    os.remove(run / "masks")
    (run / "masks.saved").rename(run / "masks")
    returncode, output = Cli(*args, log=tmp_path / "second.log").wait()
    assert returncode == 0, output
    assert f"{8 - committed}/8" in output  # only the shards the first run left
    assert_exactly_once(run, 8)


def test_verbose_prints_the_traceback_too(nothing_starts, frames, tmp_path):
    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    arguments = ["segment", str(corpus), "--model", "no_such_model", "--out", str(tmp_path)]
    quiet = CliRunner().invoke(cli.app, arguments)
    verbose = CliRunner().invoke(cli.app, ["--verbose", *arguments])
    assert quiet.exit_code == verbose.exit_code == 2
    assert "Traceback" not in quiet.output
    assert "Traceback" in verbose.output and "UnknownModelError" in verbose.output
    assert Path(tmp_path).exists()
