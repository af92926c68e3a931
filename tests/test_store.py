"""The run folder and the shard commit protocol, on a local disk and on S3 (moto)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow import schema
from segflow.manifest import Shard
from segflow.store import RunConflictError, RunStore
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

    store.commit_shard(Shard(1, 2, 3), _tables("c"), {"shard": 1, "images": 1})
    assert store.committed() == {1}
    # A retried shard overwrites its files rather than adding to them.
    store.commit_shard(Shard(1, 2, 3), _tables("c"), {"shard": 1, "images": 1})
    fs = store.fs
    images = fs.glob(store.path("images", "*.parquet"))
    assert [p.rsplit("/", 1)[1] for p in images] == ["shard-000001.parquet"]
    for table in schema.TABLES:
        with fs.open(store.path(table, "shard-000001.parquet"), "rb") as f:
            assert schema.read_table(table, f).num_rows == (1 if table == "images" else 0)
    assert store.shard_summaries() == [{"shard": 1, "images": 1}]

    fs.makedirs(store.path("_tmp", "killed-attempt"), exist_ok=True)
    fs.pipe_file(store.path("_tmp", "killed-attempt", "masks.parquet"), b"partial")
    store.finish({"images": 1})
    assert not fs.exists(store.path("_tmp"))
    assert json.loads(fs.cat_file(store.path("summary.json"))) == {"images": 1}


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


def test_the_readmes_direct_query_reads_committed_shards_only(tmp_path):
    """After a crash between a shard's file moves and its commit marker, the files of that
    shard are in place: the README's DuckDB query of the files leaves them out."""
    readme = (REPO_ROOT / "README.md").read_text()
    [query] = re.findall(r"```sql\n(.*?_commits.*?)```", readme, re.DOTALL)
    store = RunStore(str(tmp_path / "out"), "crashed")
    store.prepare({"input": "in"})
    store.commit_shard(Shard(0, 0, 1), _tables("a", area=2), {"shard": 0})
    store.commit_shard(Shard(1, 1, 2), _tables("b", area=3), {"shard": 1})
    store.commit_shard(Shard(2, 2, 3), _tables("c", area=5), {"shard": 2})
    os.remove(store.path("_commits", "shard-000002.json"))  # killed before the marker
    query = query.replace("out/demo/", f"{tmp_path}/out/")
    db = duckdb.connect()
    assert db.sql(query).fetchall() == [("road", 5, 2)]
    every_file = f"'{tmp_path}/out/run=*/masks/*.parquet'"
    assert db.execute(f"SELECT sum(area)::INT FROM {every_file}").fetchone() == (10,)
