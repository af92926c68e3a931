"""The distributed flow with real components: Prefect's test server, Ray (local and a
two-node ``ray start`` cluster with token auth), a moto S3 endpoint, DuckDB on the output."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segflow.store import RunStore
from tests.conftest import REPO_ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEGFLOW = str(Path(sys.executable).with_name("segflow"))


def make_corpus(folder: Path, frames: list[Path], good: int, bad: bool = True) -> Path:
    folder.mkdir(parents=True)
    for frame in frames[:good]:
        shutil.copy(frame, folder / frame.name)
    if bad:
        (folder / "empty.png").write_bytes(b"")
        (folder / "truncated.png").write_bytes(frames[0].read_bytes()[:5000])
        (folder / "notes.jpg").write_bytes(b"not an image")
    return folder


def store_of(run: Path | str) -> RunStore:
    """The store of the run folder ``OUT/run=<id>``."""
    out, folder = str(run).rstrip("/").rsplit("/", 1)
    return RunStore(out, folder.removeprefix("run="))


def table(run: Path | str, name: str) -> str:
    """DuckDB's reading of a table's committed files (a glob would also read a killed
    attempt's files, which no commit added)."""
    return "read_parquet([{}])".format(", ".join(f"'{f}'" for f in store_of(run).files(name)))


def assert_exactly_once(run: Path, expected_images: int) -> None:
    con = duckdb.connect()
    rows, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT image_id) FROM {table(run, 'images')}"
    ).fetchone()
    assert rows == distinct == expected_images
    # Semantic masks tile each image: their areas add up to the image, once per image.
    mismatched = con.execute(
        f"""SELECT i.uri FROM {table(run, "images")} i
            JOIN (SELECT image_id, sum(area) AS a FROM {table(run, "masks")} GROUP BY 1) m
            USING (image_id) WHERE m.a <> i.height::BIGINT * i.width"""
    ).fetchall()
    assert mismatched == []


def run_flow(**kwargs):
    from pipelines.segment import segment

    return segment(**kwargs)


def test_flow_runs_exactly_once_and_a_rerun_resumes(
    prefect_harness, local_ray, frames, shared, tmp_path
):
    corpus = make_corpus(tmp_path / "in put", frames, good=7)
    model = str(shared / "models" / "espnet_camvid.pt2")
    out = str(tmp_path / "out")
    summary = run_flow(input=str(corpus), model=model, out=out, shard_size=3, run_id="r1")
    assert (summary["images"], summary["failed"], summary["shards"]) == (10, 3, 4)
    run = Path(out) / "run=r1"
    assert_exactly_once(run, 10)
    con = duckdb.connect()
    errors = con.execute(f"SELECT uri, stage FROM {table(run, 'errors')} ORDER BY uri").fetchall()
    assert [(Path(u).name, s) for u, s in errors] == [
        ("empty.png", "decode"),
        ("notes.jpg", "decode"),
        ("truncated.png", "decode"),
    ]
    # The RLE that landed in Parquet decodes (pycocotools) to exactly the model's prediction.
    from segflow.decode import decode_image
    from segflow.models import load_model

    uri, height, width = con.execute(
        f"SELECT uri, height, width FROM {table(run, 'images')} WHERE status = 'ok' LIMIT 1"
    ).fetchone()
    [expected] = load_model(model, device="cpu").predict(
        [decode_image(fsspec.open(uri, "rb").open().read())]
    )
    rebuilt = np.full((height, width), -1)
    for class_id, counts in con.execute(
        f"SELECT class_id, counts FROM {table(run, 'masks')} WHERE uri = ?", [uri]
    ).fetchall():
        rebuilt[coco_mask.decode({"size": [height, width], "counts": counts}) == 1] = class_id
    np.testing.assert_array_equal(rebuilt, expected.labels.numpy())

    # Straight to the REST API: prefect 3.8.8's own client sends null paging fields that its
    # server rejects (422) with the pinned pydantic.
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["segment-run-r1"]}}, "limit": 10, "offset": 0},
    )
    response.raise_for_status()
    [artifact] = response.json()
    assert "| images | 10 |" in artifact["data"]

    again = run_flow(input=str(corpus), model=model, out=out, shard_size=3, run_id="r1")
    assert again["shards_run_now"] == 0
    assert again["images"] == 10
    assert json.loads((run / "summary.json").read_text())["shards_run_now"] == 0


def test_a_killed_actor_is_restarted_and_every_image_lands_once(
    prefect_harness, local_ray, frames, shared, tmp_path
):
    corpus = make_corpus(tmp_path / "in", frames, good=16, bad=False)
    killed = []

    def kill_first_worker(summary):
        if not killed:
            pid = int(summary["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # a crash, not a polite shutdown
            killed.append(pid)

    summary = run_flow(
        input=str(corpus),
        model=str(shared / "models" / "espnet_camvid.pt2"),
        out=str(tmp_path / "out"),
        shard_size=2,
        run_id="k",
        on_shard=kill_first_worker,
    )
    assert killed
    assert (summary["images"], summary["failed"], summary["shards"]) == (16, 0, 8)
    assert_exactly_once(tmp_path / "out" / "run=k", 16)


class Cli:
    """The ``segflow segment`` command in a subprocess, its output collected in a file (a
    pipe nobody reads would fill up and block it)."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None, **kwargs):
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [SEGFLOW, "segment", *args],
                env={**os.environ, **(env or {})},
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO_ROOT,
                **kwargs,
            )

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        returncode = self.process.wait(timeout=timeout)
        return returncode, self.log.read_text()


def test_interrupted_run_resumes_only_uncommitted_shards(frames, shared, tmp_path):
    corpus = make_corpus(tmp_path / "in", frames, good=24, bad=False)
    out = tmp_path / "out"
    args = [str(corpus), "--model", str(shared / "models" / "espnet_camvid.pt2")]
    args += ["--out", str(out), "--shard-size", "2", "--run-id", "i"]
    first = Cli(*args, log=tmp_path / "first.log", start_new_session=True)
    store = RunStore(str(out), "i")
    deadline = time.monotonic() + 300
    while not store.exists() and first.process.poll() is None:
        time.sleep(0.2)
    while len(store.committed()) < 3 and first.process.poll() is None:
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.2)
    os.killpg(first.process.pid, signal.SIGINT)  # Ctrl-C
    returncode, output = first.wait(timeout=120)
    assert returncode != 0, output
    committed_before = len(store.committed())
    assert 3 <= committed_before < 12, f"the interrupt came too late: {committed_before} shards"

    returncode, output = Cli(*args, log=tmp_path / "second.log").wait()
    assert returncode == 0, output
    summary = json.loads((out / "run=i" / "summary.json").read_text())
    assert summary["shards_run_now"] == 12 - committed_before
    assert_exactly_once(out / "run=i", 24)


def test_s3_in_and_out_with_bad_files(s3_env, frames, shared, tmp_path):
    os.environ.update(s3_env)
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("corpus")
        local = make_corpus(tmp_path / "Tile 1", frames, good=4)
        fs.put(str(local), "corpus/aerial/Tile 1", recursive=True)
    finally:
        for key in s3_env:
            os.environ.pop(key)
    returncode, output = Cli(
        "s3://corpus/aerial",
        "--model",
        str(shared / "models" / "espnet_camvid.pt2"),
        "--out",
        "s3://corpus/out",
        "--run-id",
        "s3run",
        log=tmp_path / "cli.log",
        env=s3_env,
    ).wait()
    assert returncode == 1, output  # some images failed, and the exit status says so
    assert "3 image(s) failed" in output
    assert 'see segflow query s3://corpus/out/run=s3run "SELECT * FROM errors"' in output
    fs.get("corpus/out/run=s3run", str(tmp_path / "copy" / "run=s3run"), recursive=True)
    assert_exactly_once(tmp_path / "copy" / "run=s3run", 7)


def test_bad_jobs_fail_before_any_work(shared, tmp_path, frames):
    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    model = str(shared / "models" / "espnet_camvid.pt2")
    cases = {
        "unknown model": ([str(corpus), "--model", "no_such_model"], "no_such_model"),
        "missing weights": (
            [str(corpus), "--model", "lraspp_mobilenet_v3_large"],
            "pretrained weights for lraspp_mobilenet_v3_large not found",
        ),
        "missing input": ([str(tmp_path / "nope"), "--model", model], "does not exist"),
        "unreachable cluster": (
            [str(corpus), "--model", model, "--ray-address", f"127.0.0.1:{free_port()}"],
            "unreachable",
        ),
        "gpu decoding on a cluster without GPUs": (
            [str(corpus), "--model", model, "--decode", "gpu"],
            "--decode gpu needs a GPU, and the Ray cluster has none",
        ),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        # An empty hub cache, so the registry model has no weights whatever this machine has.
        env = {"TORCH_HOME": str(tmp_path / "empty_torch_home")}
        returncode, output = Cli(*args, "--out", str(out), log=tmp_path / "cli.log", env=env).wait()
        assert returncode == 2, (name, output)
        assert message in output, (name, output)
        assert not out.exists(), name

    out = tmp_path / "conflict"
    args = [str(corpus), "--model", model, "--out", str(out), "--run-id", "c"]
    returncode, output = Cli(*args, log=tmp_path / "first.log").wait()
    assert returncode == 0, output
    returncode, output = Cli(*args, "--shard-size", "5", log=tmp_path / "second.log").wait()
    assert returncode == 2 and "another configuration" in output, output


def test_actors_per_gpu_is_refused_where_there_is_no_gpu(shared, tmp_path, frames):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a local Ray on this machine has GPUs, which --actors-per-gpu shares")
    corpus = make_corpus(tmp_path / "in", frames, good=1, bad=False)
    model = str(shared / "models" / "espnet_camvid.pt2")
    cases = {
        # Before Ray starts: the job itself says the actors get no GPU.
        "cpu": (["--device", "cpu"], "and --device is cpu: CPU actors are already one process"),
        # Through Ray: the local Ray this CPU-only machine starts has no GPUs.
        "auto": ([], "and the Ray cluster has no GPUs: CPU actors are already one process"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / name
        returncode, output = Cli(
            str(corpus),
            "--model",
            model,
            "--out",
            str(out),
            "--actors-per-gpu",
            "2",
            *args,
            log=tmp_path / f"{name}.log",
        ).wait()
        assert returncode == 2, (name, output)
        assert "--actors-per-gpu 2 shares a GPU between actors, " + message in output, output
        assert not out.exists(), name


def actor_pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def is_stopped(actor) -> bool:
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


def shard_worker_pids(run: Path) -> set[int]:
    return {int(s["worker"].rsplit(":", 1)[1]) for s in store_of(run).shard_summaries()}


def prestartable_run(frames, shared, folder: Path, images: int, run_id: str) -> dict:
    return {
        "input": str(make_corpus(folder / "in", frames, good=images, bad=False)),
        "model": str(shared / "models" / "espnet_camvid.pt2"),
        "out": str(folder / "out"),
        "shard_size": 2,
        "run_id": run_id,
    }


def test_the_flow_takes_over_actors_prestarted_for_it_and_stops_them(
    prefect_harness, local_ray, frames, shared, tmp_path
):
    from pipelines.segment import prestart_segment
    from segflow.job import Job

    run = prestartable_run(frames, shared, tmp_path, images=6, run_id="p")
    prestarted = prestart_segment(Job(**run))
    prestarted_pids = {actor_pid(actor) for actor in prestarted.actors}
    summary = run_flow(**run)
    assert summary["images"] == 6
    assert shard_worker_pids(tmp_path / "out" / "run=p") <= prestarted_pids
    assert all(is_stopped(actor) for actor in prestarted.actors)

    # A rerun of the finished run has nothing to do: the actors started for it are stopped.
    prestarted = prestart_segment(Job(**run))
    assert run_flow(**run)["shards_run_now"] == 0
    assert all(is_stopped(actor) for actor in prestarted.actors)


def test_actors_prestarted_for_another_configuration_are_replaced(
    prefect_harness, local_ray, frames, shared, tmp_path
):
    from pipelines.segment import prestart_segment
    from segflow.job import Job

    run = prestartable_run(frames, shared, tmp_path, images=4, run_id="q")
    prestarted = prestart_segment(Job(**run, batch_size=1))
    prestarted_pids = {actor_pid(actor) for actor in prestarted.actors}
    assert run_flow(**run, batch_size=2)["images"] == 4
    assert not shard_worker_pids(tmp_path / "out" / "run=q") & prestarted_pids
    assert all(is_stopped(actor) for actor in prestarted.actors)
    assert_exactly_once(tmp_path / "out" / "run=q", 4)


def test_a_fifo_in_the_corpus_fails_its_image_not_the_run(frames, shared, tmp_path):
    corpus = make_corpus(tmp_path / "in", frames, good=3, bad=False)
    os.mkfifo(corpus / "x.png")  # reading it would wait for a writer that never comes
    out = tmp_path / "out"
    args = [str(corpus), "--model", str(shared / "models" / "espnet_camvid.pt2")]
    try:
        returncode, output = Cli(
            *args, "--out", str(out), "--run-id", "f", log=tmp_path / "cli.log"
        ).wait(timeout=300)
    finally:
        with contextlib.suppress(OSError):  # unblock a reader stuck in open(), if any
            os.close(os.open(corpus / "x.png", os.O_WRONLY | os.O_NONBLOCK))
    assert returncode == 1, output  # an image failed
    assert "1 image(s) failed" in output
    assert "leaked" not in output  # nothing of DuckDB's bindings' leak report at exit
    errors = (
        duckdb.connect()
        .execute(f"SELECT uri, stage, message FROM {table(out / 'run=f', 'errors')}")
        .fetchall()
    )
    assert [(Path(uri).name, stage) for uri, stage, _ in errors] == [("x.png", "read")]
    assert errors[0][2].startswith("not a regular file (a FIFO)")
    assert_exactly_once(out / "run=f", 4)


def test_a_shard_that_stalls_every_time_is_retried_then_stops_the_run(shared, tmp_path):
    # An object store that accepts connections and never answers, with a read timeout
    # longer than the stall timeout: only the stall watchdog can end the wait.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("s3://corpus/frame.png\n")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_TMPDIR": ray_tmp,
    }
    args = [str(manifest), "--model", str(shared / "models" / "espnet_camvid.pt2")]
    args += ["--out", str(tmp_path / "out"), "--run-id", "s"]
    args += ["--read-timeout", "3600", "--stall-timeout", "5"]
    try:
        returncode, output = Cli(*args, log=tmp_path / "cli.log", env=env).wait(timeout=400)
        stalls = [
            line
            for log in Path(ray_tmp).rglob("worker-*.err")
            for line in log.read_text().splitlines()
            if "segflow: shard 0: nothing done" in line
        ]
    finally:
        silent.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert returncode == 3, output  # the run started and could not finish
    assert "shard-000000 (images 0 to 0, from s3://corpus/frame.png) did not finish" in output
    assert "its actor died on each of 3 attempts" in output
    assert "no image of its shards is done for 5 s" in output
    assert len(stalls) == 3, stalls  # each attempt stalled, and the watchdog ended it
    assert RunStore(str(tmp_path / "out"), "s").committed() == set()


@pytest.mark.slow
@pytest.mark.integration
def test_an_actor_runs_its_next_shard_beside_the_last_taking_turns_on_the_model(frames, tmp_path):
    corpus = make_corpus(tmp_path / "in", frames, good=8, bad=False)
    log, out = tmp_path / "forward.log", tmp_path / "out"
    args = [str(corpus), "--model", "tests.user_models:make_turn_taking_model"]
    args += ["--model-option", f"log={log}", "--out", str(out), "--run-id", "t"]
    args += ["--batch-size", "1", "--shard-size", "2", "--cpus-per-actor", "2"]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    returncode, output = Cli(*args, log=tmp_path / "cli.log", env=env).wait()
    assert returncode == 0, output
    assert_exactly_once(out / "run=t", 8)
    passes = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _, _ in passes}) == 1  # one actor ran every shard
    intervals = sorted((float(start), float(end)) for _, start, end in passes)
    assert len(intervals) == 8
    # One forward pass at a time...
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start
    # ... while the actor's shards overlap: the next began before the last was done.
    summaries = store_of(out / "run=t").shard_summaries()
    assert len(summaries) == 4
    assert any(
        later["started_at"] < earlier["finished_at"]
        for earlier, later in itertools.pairwise(summaries)
    )


def test_segment_with_compact_leaves_one_file_a_table_with_the_same_rows(frames, shared, tmp_path):
    """``segment --compact``: once every shard is committed the run is compacted, each table
    one file (sorted by image_id) whose rows are exactly those of the shard files it
    replaced: the table's version before the compaction, which Delta keeps readable for the
    retention (7 days by default), so a reader that listed those files keeps reading them."""
    from deltalake import DeltaTable

    from segflow import schema

    corpus = make_corpus(tmp_path / "in", frames, good=6, bad=False)
    out = tmp_path / "out"
    args = [str(corpus), "--model", str(shared / "models" / "espnet_camvid.pt2")]
    args += ["--gt", f"masks:{shared / 'data' / 'camvid_val' / 'labels'}", "--ignore-index", "11"]
    args += ["--out", str(out), "--shard-size", "2", "--run-id", "c", "--compact"]
    returncode, output = Cli(*args, log=tmp_path / "segment.log").wait()
    assert returncode == 0, output
    assert "compacted" in output
    store = RunStore(str(out), "c")
    for name in schema.TABLES:
        table = DeltaTable(store.table_uri(name))
        # The compaction's commit: segflow's rewrite, marked in the commit's information.
        [version] = [v["version"] for v in table.history() if v.get("segflow") == "compact"]
        before = DeltaTable(store.table_uri(name), version=version - 1)
        shard_files = before.file_uris()
        assert len(shard_files) == 3, name  # a file a shard
        assert all(Path(f).exists() for f in shard_files)  # kept for the retention
        rows, compacted = pq_rows(shard_files), store.files(name)
        # One file of every row; none for a table without rows (errors, COCO's state).
        assert len(compacted) == (1 if rows else 0), name
        assert bool(rows) == (name in ("masks", "images", "class_stats", "confusion")), name
        assert pq_rows(compacted) == rows, name
        ids = [row["image_id"] for row in pq_rows(compacted, sort=False)]
        assert ids == sorted(ids), name
    assert_exactly_once(out / "run=c", 6)


def pq_rows(files: list[str], sort: bool = True) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    return (
        sorted(rows, key=lambda row: json.dumps(row, default=str, sort_keys=True)) if sort else rows
    )
