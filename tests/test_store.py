"""The run folder and the shard commit protocol, on a local disk and on S3 (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from typer.testing import CliRunner

from segflow import schema
from segflow.cli import app
from segflow.manifest import Shard
from segflow.store import (
    SHARDS_TABLE,
    RunConflictError,
    RunNotFinishedError,
    RunStore,
    RunStoreError,
    shard_of_file,
)
from tests.conftest import REPO_ROOT


def _tables(uri: str, area: int = 0) -> dict[str, pa.Table]:
    """One image of 2x3 pixels; with ``area``, one mask of that many pixels."""
    mask = {
        "run_id": "r",
        "image_id": schema.image_id_for(uri),
        "uri": uri,
        "instance": None,
        "class_id": 1,
        "class_name": "road",
        "score": None,
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "area": area,
        "counts": "0" + str(area),
        "height": 2,
        "width": 3,
        "model": "m",
    }
    image = {
        "run_id": "r",
        "image_id": schema.image_id_for(uri),
        "uri": uri,
        "status": "ok",
        "height": 2,
        "width": 3,
        "num_masks": 0,
        "read_ms": 1.0,
        "decode_ms": 1.0,
        "infer_ms": 1.0,
        "encode_ms": 1.0,
        "model": "m",
        "processed_at": datetime.now(UTC),
        "crs": None,
        "transform": None,
        "gt_uri": None,
        "pixel_accuracy": None,
        "miou": None,
        "mdice": None,
        "boundary_iou": None,
    }
    rows = {"images": [image], "masks": [mask] if area else []}
    return {name: schema.table_from_rows(name, rows.get(name, [])) for name in schema.TABLES}


def _exercise(out: str) -> None:
    store = RunStore(out, "run1")
    config = {"input": "in", "model": "m", "shard_size": 2}
    assert store.prepare(config) is False
    assert store.prepare(dict(config)) is True  # the same command resumes
    with pytest.raises(RunConflictError, match="model: 'm' there, 'other' now"):
        store.prepare({**config, "model": "other"})

    assert not store.has_manifest()
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"uri": ["a", "b", "c"]}), f"{tmp}/m.parquet", row_group_size=2)
        store.put_manifest(f"{tmp}/m.parquet")
    assert store.has_manifest()
    with store.open_manifest() as manifest:
        assert len(manifest) == 3
        assert manifest.uris(Shard(0, 1, 3)) == ["b", "c"]
    assert store.committed() == set()

    # Every table exists, empty, from the start: a reader of a fresh run sees no rows.
    assert {name: store.files(name) for name in schema.TABLES} == {n: [] for n in schema.TABLES}
    assert DeltaTable(store.table_uri("masks"), storage_options=_options(store)).version() == 0

    store.commit_shard(Shard(1, 2, 3), _tables("c"), {"shard": 1, "images": 1})
    assert store.committed() == {1}
    # A retried shard, written again and committed again, adds nothing: its transaction is
    # in every table already. Its second files are in no table.
    store.commit_shard(Shard(1, 2, 3), _tables("c"), {"shard": 1, "images": 1})
    fs = store.fs
    [images] = store.files("images")
    assert images.rsplit("/", 1)[1].startswith("shard-000001-")
    assert len(fs.glob(store.path("images", "*.parquet"))) == 2
    for table in schema.TABLES:
        [path] = store.files(table)
        with fs.open(path, "rb") as f:
            assert schema.read_table(table, f).num_rows == (1 if table == "images" else 0)
        delta = DeltaTable(store.table_uri(table), storage_options=_options(store))
        assert delta.to_pyarrow_dataset().count_rows() == (1 if table == "images" else 0)
    assert store.shard_summaries() == [{"shard": 1, "images": 1}]

    store.finish({"images": 1})
    assert json.loads(fs.cat_file(store.path("summary.json"))) == {"images": 1}
    store.compact(retain_hours=0)
    [images] = store.files("images")
    assert shard_of_file(images) is None  # a file of the compaction
    assert _delta_rows(store, "images").column("uri").to_pylist() == ["c"]
    fs.invalidate_cache()  # s3fs lists from a cache
    assert len(fs.glob(store.path("images", "*.parquet"))) == 1  # vacuumed


def _options(store: RunStore) -> dict[str, str] | None:
    return store.storage_options()


def test_local_run_folder(tmp_path):
    _exercise(str(tmp_path / "out"))


@pytest.mark.integration
def test_s3_run_folder(s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("store-test")
    fsspec.filesystem("s3").clear_instance_cache()
    _exercise("s3://store-test/out")


def test_run_ids_must_be_plain_names(tmp_path):
    for bad in ("", "a/b", "_tmp", ".hidden"):
        with pytest.raises(ValueError, match="plain name"):
            RunStore(str(tmp_path), bad)


def _shard_tables(shard: int, images: int = 3) -> dict[str, pa.Table]:
    """A shard of ``images`` images, each with two masks; URIs ``s<shard>/<k>``."""
    parts = [_tables(f"s{shard}/{k}", area=2) for k in range(images)]
    tables = {name: pa.concat_tables([p[name] for p in parts]) for name in schema.TABLES}
    tables["masks"] = pa.concat_tables([tables["masks"], tables["masks"]])
    return tables


# A reader that knows nothing of segflow: Polars over the Delta tables, polling until it has
# seen every shard; it prints what it saw that it must not have seen.
POLLING_READER = """
import json, sys
import polars as pl
run, shards = sys.argv[1], int(sys.argv[2])
problems, polls = [], 0
while True:
    polls += 1
    masks = pl.scan_delta(f"{run}/masks").select("uri", "image_id").collect()
    images = pl.scan_delta(f"{run}/images").select("uri", "image_id").collect()
    if images["image_id"].n_unique() != images.height:
        problems.append("an image twice in images")
    for name, frame, per_shard in (("images", images, 3), ("masks", masks, 6)):
        counts = frame.group_by(pl.col("uri").str.split("/").list.first()).len()
        problems += [f"{name}: {row}" for row in counts.filter(pl.col("len") != per_shard).rows()]
    if images.height == 3 * shards:
        break
print(json.dumps({"problems": problems, "polls": polls}))
"""


def test_a_delta_reader_sees_whole_shards_only_while_a_run_commits(tmp_path):
    store = RunStore(str(tmp_path / "out"), "live")
    store.prepare({"input": "in"})
    shards = 40
    reader = subprocess.Popen(
        [sys.executable, "-c", POLLING_READER, store.root, str(shards)],
        stdout=subprocess.PIPE,
        text=True,
    )
    for index in range(shards):
        store.commit_shard(Shard(index, index, index + 1), _shard_tables(index), {"shard": index})
    out, _ = reader.communicate(timeout=300)
    assert reader.returncode == 0
    assert json.loads(out)["problems"] == []


def _delta_rows(store: RunStore, name: str) -> pa.Table:
    return (
        DeltaTable(store.table_uri(name), storage_options=store.storage_options())
        .to_pyarrow_dataset()
        .to_table()
    )


def test_a_crash_between_writes_and_commit_shows_nothing_and_a_resume_commits_once(tmp_path):
    store = RunStore(str(tmp_path / "out"), "crashed")
    store.prepare({"input": "in"})
    store.commit_shard(Shard(0, 0, 1), _shard_tables(0), {"shard": 0})
    # A process that wrote shard 1's files and died before its driver committed them.
    crash = (
        "import os, sys\n"
        "from segflow.manifest import Shard\n"
        "from segflow.store import RunStore\n"
        "from tests.test_store import _shard_tables\n"
        f"RunStore({str(tmp_path / 'out')!r}, 'crashed').write_shard(Shard(1, 1, 2), "
        "_shard_tables(1), {'shard': 1})\n"
        "os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", crash], cwd=REPO_ROOT, check=False)
    assert done.returncode == 9
    assert len(store.fs.glob(store.path("masks", "shard-000001-*.parquet"))) == 1
    assert store.committed() == {0}
    for name in ("masks", "images"):
        assert set(_delta_rows(store, name).column("uri").to_pylist()) == {
            f"s0/{k}" for k in range(3)
        }
        assert [shard_of_file(f) for f in store.files(name)] == [0]

    # A driver killed half-way through committing shard 2: its masks are in, nothing else.
    partial = store.write_shard(Shard(2, 2, 3), _shard_tables(2), {"shard": 2})
    store._commit_file(2, next(f for f in partial.files if f.table == "masks"))
    assert store.committed() == {0}
    assert _delta_rows(store, "masks").num_rows == 12 and _delta_rows(store, "images").num_rows == 3

    # The resume runs both shards again, and commits each table's rows once.
    for index in (1, 2):
        store.commit_shard(Shard(index, index, index + 1), _shard_tables(index), {"shard": index})
    assert store.committed() == {0, 1, 2}
    images = _delta_rows(store, "images").column("image_id").to_pylist()
    assert len(images) == len(set(images)) == 9
    assert _delta_rows(store, "masks").num_rows == 18
    db = duckdb.connect()
    files = store.files("masks")
    assert db.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone() == (18,)
    assert store.shard_summaries() == [{"shard": 0}, {"shard": 1}, {"shard": 2}]


# --------------------------------------------------------------------------------------------
# Compaction.

ANSWERS = {
    "masks": "SELECT count(*), count(DISTINCT image_id), sum(area) FROM read_parquet(?)",
    "images": "SELECT count(*), count(DISTINCT image_id), min(uri), max(uri) FROM read_parquet(?)",
}


def _answers(store: RunStore) -> dict[str, Any]:
    """The same questions through DuckDB over :meth:`RunStore.files` and Polars over Delta."""
    db = duckdb.connect()
    found: dict[str, Any] = {
        name: db.execute(sql, [store.files(name)]).fetchall() for name, sql in ANSWERS.items()
    }
    for name in ("masks", "images"):
        frame = pl.scan_delta(store.table_uri(name)).select("image_id").collect()
        found[f"polars {name}"] = (frame.height, frame["image_id"].n_unique())
    return found


def _finished_run(out: str, shards: int = 12) -> RunStore:
    store = RunStore(out, "done")
    store.prepare({"input": "in"})
    for index in range(shards):
        store.commit_shard(Shard(index, index, index + 1), _shard_tables(index), {"shard": index})
    store.write_shard(Shard(shards, shards, shards + 1), _shard_tables(shards), {})  # a stray
    return store


def test_compaction_keeps_the_answers_in_few_sorted_files(tmp_path):
    store = _finished_run(str(tmp_path / "out"))
    with pytest.raises(RunNotFinishedError, match="not finished"):
        store.compact()
    store.finish({"images": 36})
    before = _answers(store)
    assert before["masks"] == [(72, 36, 144)]
    files_before = {name: len(os.listdir(store.path(name))) for name in schema.TABLES}

    result = CliRunner().invoke(app, ["compact", store.uri, "--retain-hours", "0"])
    assert result.exit_code == 0, result.output
    assert _answers(store) == before
    for name in schema.TABLES:
        files = store.files(name)
        assert len(files) <= 1, name
        on_disk = [f for f in os.listdir(store.path(name)) if f.endswith(".parquet")]
        assert len(on_disk) == len(files) < files_before[name]  # replaced files and the stray
    [masks] = store.files("masks")
    image_ids = pq.read_table(masks, columns=["image_id"]).column(0).to_pylist()
    assert image_ids == sorted(image_ids)  # one image's rows are one range
    assert store.committed() == set(range(12))
    assert len(store.shard_summaries()) == 12
    with pytest.raises(RunStoreError, match="compacted"):
        store.files("masks", shards={0})


def test_an_unfinished_run_is_not_compacted(tmp_path):
    store = _finished_run(str(tmp_path / "out"), shards=2)
    result = CliRunner().invoke(app, ["compact", store.uri])
    assert result.exit_code == 2
    assert "not finished" in result.output


def test_a_killed_compaction_leaves_the_run_readable_with_the_same_answers(tmp_path):
    store = _finished_run(str(tmp_path / "out"))
    store.finish({"images": 36})
    before = _answers(store)
    log = Path(store.path("masks", "_delta_log"))
    versions = len(list(log.glob("*.json")))
    compaction = subprocess.Popen(
        [sys.executable, "-m", "segflow.cli", "compact", store.uri, "--retain-hours", "0"],
        cwd=REPO_ROOT,
    )
    # Killed once the first table is compacted, before the others are.
    while len(list(log.glob("*.json"))) == versions and compaction.poll() is None:
        time.sleep(0.01)
    compaction.kill()
    compaction.wait()
    assert _answers(store) == before
    store.compact(retain_hours=0)
    assert _answers(store) == before


def test_the_rows_of_a_few_images_are_theirs_before_and_after_compaction(tmp_path):
    from segflow.evaluation import open_run, rows_of_images

    store = _finished_run(str(tmp_path / "out"))
    store.finish({"images": 36})
    run = open_run(store.uri)

    def rows(image_ids):
        read = []
        # Through the read-only file system, and natively (a connection of SELECTs only).
        for only_selects in (False, True):
            with run.connect(only_selects=only_selects) as db:
                wanted = db.sql(
                    "SELECT * FROM masks WHERE list_contains($ids, image_id) ORDER BY ALL",
                    params={"ids": image_ids},
                ).fetchall()
                found = rows_of_images(db, "masks", image_ids)
                assert rows_of_images(db, "errors", image_ids).num_rows == 0  # no files
                read.append((sorted(found.to_pylist(), key=str), wanted, found.num_rows))
        assert read[0] == read[1]
        return read[0]

    with run.connect() as db:
        image_ids = [i for (i,) in db.sql("SELECT image_id FROM images LIMIT 3").fetchall()]
    before = rows([*image_ids, -1])
    assert before[2] == len(before[1]) > 0
    CliRunner().invoke(app, ["compact", store.uri, "--retain-hours", "0"])
    assert rows([*image_ids, -1]) == before
    assert rows([-1])[2] == 0


def test_a_finished_run_is_listed_without_its_shards_log(tmp_path):
    import shutil

    store = _finished_run(str(tmp_path / "out"), shards=3)
    listed = store.table_files()
    assert listed == {name: store.files(name) for name in schema.TABLES}
    assert len(listed["masks"]) == 3
    # The shards table tells which shards a run has committed while it commits; once it has
    # finished, every table holds every shard, and the shards table is not read.
    shutil.move(store.path(SHARDS_TABLE), tmp_path / "elsewhere")
    assert store.table_files()["masks"] == []  # unfinished: no shard is committed
    store.finish({"images": 9})
    assert store.table_files() == listed


def test_a_finished_and_a_compacted_run_are_listed_from_checkpoints(tmp_path):
    store = _finished_run(str(tmp_path / "out"), shards=3)

    def listed_from_the_last_checkpoint() -> dict[str, list[str]]:
        """Each table's files, listed with its JSON commits taken away: only a checkpoint of
        its last version still lists them."""
        listed = {}
        for name in schema.TABLES:
            log = Path(store.path(name, "_delta_log"))
            for commit in log.glob("*.json"):
                commit.rename(commit.with_suffix(".moved"))
            try:
                listed[name] = store.files(name)
            finally:
                for commit in log.glob("*.moved"):
                    commit.rename(commit.with_suffix(".json"))
        return listed

    with pytest.raises(RunStoreError, match="not a Delta table"):
        listed_from_the_last_checkpoint()
    store.finish({"images": 9})
    listed = {name: store.files(name) for name in schema.TABLES}
    assert len(listed["masks"]) == 3
    assert listed_from_the_last_checkpoint() == listed
    store.compact(retain_hours=0)
    compacted = {name: store.files(name) for name in schema.TABLES}
    assert len(compacted["masks"]) == 1
    assert listed_from_the_last_checkpoint() == compacted


def test_a_compaction_that_fails_commits_nothing(tmp_path):
    store = _finished_run(str(tmp_path / "out"))
    store.finish({"images": 36})
    versions = {name: store._delta(name).version() for name in schema.TABLES}
    listed = {name: store.files(name) for name in schema.TABLES}
    Path(store.files("images")[5]).write_bytes(b"not parquet")  # masks compacts, images fails
    result = CliRunner().invoke(app, ["compact", store.uri, "--retain-hours", "0"])
    assert result.exit_code == 3, result.output  # started: masks' compaction is kept
    assert "table 'images' could not be compacted, and was left as it was" in result.output
    assert [shard_of_file(file) for file in store.files("masks")] == [None]  # compacted
    for name in set(schema.TABLES) - {"masks"}:
        assert store._delta(name).version() == versions[name], name
        assert store.files(name) == listed[name], name


def test_a_compaction_sorts_a_range_of_image_ids_at_a_time(tmp_path, monkeypatch):
    """Masks of 24 MiB of RLE strings (about 14 MB of Parquet in 24 files), compacted a range
    of image_ids of 1 MiB of Parquet at a time, read 5 files at a time, into 4 MiB files."""
    import random

    store = RunStore(str(tmp_path / "out"), "big")
    store.prepare({"input": "in"})
    rng = random.Random(0)
    for index in range(24):
        tables = _shard_tables(index, images=32)
        counts = [
            "".join(rng.choices("0123456789abcdefghij", k=16 * 2**10))
            for _ in range(tables["masks"].num_rows)
        ]
        masks = tables["masks"]
        column = masks.schema.get_field_index("counts")
        tables["masks"] = masks.set_column(column, masks.schema.field(column), pa.array(counts))
        store.commit_shard(Shard(index, index, index + 1), tables, {"shard": index})
    store.finish({"images": 24 * 32})
    before = _answers(store)
    digest = "SELECT sum(hash(image_id, counts)::HUGEINT) FROM read_parquet($files)"
    digest_before = duckdb.execute(digest, {"files": store.files("masks")}).fetchall()
    monkeypatch.setattr("segflow.compaction.RANGE_BYTES", 2**20)
    monkeypatch.setattr("segflow.compaction.PART_FILES", 5)
    store.compact(target_size=4 * 2**20, retain_hours=0)
    assert _answers(store) == before
    assert duckdb.execute(digest, {"files": store.files("masks")}).fetchall() == digest_before
    files = store.files("masks")  # in the order written: compacted-<uuid>-NNNNN.parquet
    assert 3 <= len(files) <= 6  # about 4 MiB each
    image_ids = [i for f in files for i in pq.read_table(f, columns=["image_id"])[0].to_pylist()]
    assert image_ids == sorted(image_ids)
