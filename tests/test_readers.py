"""Reading a run: the commands that only read its tables import neither torch nor Ray nor
Prefect, and a locked connection reads exactly the run's table files, writing none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from segflow import schema
from segflow.analytics import connect
from segflow.store import RunStore

# Each reading command in one process, then the heavy packages it imported.
READ_ONLY = """
import json, sys
from segflow.cli import app
import segflow.analytics, segflow.decode, segflow.groundtruth, segflow.report  # show's too
for args in json.loads(sys.argv[1]):
    try:
        app(args)
    except SystemExit as done:
        assert done.code == 0, (args, done.code)
heavy = {"torch", "torchvision", "ray", "prefect"}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


@pytest.fixture
def empty_run(tmp_path: Path) -> Path:
    """A semantic run with ground truth that has committed nothing yet."""
    store = RunStore(str(tmp_path / "out"), "reading")
    store.prepare({"input": "nowhere"})
    store.write_json(
        "evaluation.json",
        {"task": "semantic", "classes": ["sky", "road"], "gt": "masks:nowhere"},
    )
    return Path(store.root)


def test_reading_commands_import_no_torch_ray_or_prefect(empty_run, tmp_path):
    commands = [
        ["query", str(empty_run), "SELECT count(*) FROM masks", "--format", "json"],
        ["evaluate", str(empty_run), "--json"],
        ["evaluate", str(empty_run), "--where", "image_id % 10 = 0", "--json"],
        ["report", str(empty_run), "--out", str(tmp_path / "report.html")],
    ]
    done = subprocess.run(
        [sys.executable, "-c", READ_ONLY, json.dumps(commands)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_an_empty_table_is_a_view_with_its_schema(empty_run):
    with connect(str(empty_run)) as db:
        for name, table_schema in schema.TABLES.items():
            relation = db.sql(f"SELECT * FROM {name}")
            assert relation.columns == table_schema.names
            assert relation.fetchall() == []


def test_a_locked_connection_reads_the_table_files_and_writes_none(instance_run, tmp_path):
    run = next(instance_run.glob("run=*"))
    shard = next(run.glob("masks/*.parquet"))
    before = shard.read_bytes()
    with connect(str(instance_run)) as db:
        for target in (f"segflow-run://{shard}", str(shard), f"file://{shard}"):
            for options in ("", " (FORMAT csv, USE_TMP_FILE false)"):
                with pytest.raises(duckdb.Error):
                    db.execute(f"COPY (SELECT 1 AS x) TO '{target}'{options}")
        # The run's other files stay out of reach, under either name.
        for other in ("run.json", "manifest.parquet", "_commits"):
            for name in (f"segflow-run://{run / other}", str(run / other)):
                with pytest.raises(duckdb.Error):
                    db.sql(f"SELECT * FROM read_blob('{name}')").fetchall()
        [(counted,)] = db.sql("SELECT count(*) FROM masks").fetchall()
    assert shard.read_bytes() == before
    assert counted == sum(pq.read_metadata(p).num_rows for p in run.glob("masks/*.parquet"))


def test_one_file_is_read_right_by_many_threads_at_once(tmp_path):
    # DuckDB's threads scan a (compacted) file's row groups at once, by seek then read on one
    # handle: on a shared position they read each other's bytes.
    import fsspec
    import numpy as np
    import pyarrow as pa

    from segflow.sql import expose_files

    values = np.random.default_rng(0).integers(0, 2**40, 1_000_000)
    path = str(tmp_path / "table.parquet")
    table = pa.table({"v": values, "s": pa.array(values.astype(str))})
    pq.write_table(table, path, row_group_size=20_000, compression="zstd")
    sql = "SELECT sum(v), sum(length(s)), count(*) FROM read_parquet({})"
    expected = duckdb.sql(sql.format(f"'{path}'")).fetchall()
    db = duckdb.connect()
    source = expose_files(db, fsspec.filesystem("file"), {"table": [path]})["table"].source()
    for _ in range(3):
        assert db.sql(sql.format(source)).fetchall() == expected


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT count(*), sum(area) FROM masks", {"masks"}),
        (
            "WITH worst AS (SELECT image_id FROM Images ORDER BY miou LIMIT 3) "
            "SELECT * FROM masks m JOIN worst USING (image_id) "
            "WHERE image_id NOT IN (SELECT image_id FROM errors)",
            {"images", "masks", "errors"},
        ),
        ("SELECT 1; SELECT * FROM main.class_stats", {"class_stats"}),
        ("SELECT 1", set(schema.TABLES)),  # names none: every table, as without the option
        ("SHOW TABLES", set(schema.TABLES)),  # not a SELECT
        ("SELECT * FROM query_table('masks')", set(schema.TABLES)),  # a table function
        ("SELECT table_name FROM information_schema.tables", set(schema.TABLES)),
    ],
)
def test_sql_names_the_tables_it_reads(sql, named):
    from segflow.sql import tables_named

    assert tables_named(sql, schema.TABLES) == named


def test_a_connection_of_some_tables_answers_as_one_of_all(instance_run):
    sql = "SELECT class_name, count(*), sum(area) FROM masks GROUP BY 1 ORDER BY 1"
    with connect(str(instance_run)) as every, connect(str(instance_run), tables={"masks"}) as db:
        views = {name for (name,) in db.sql("SELECT view_name FROM duckdb_views()").fetchall()}
        assert views >= {"masks"} and not views & (set(schema.TABLES) - {"masks"})
        assert db.sql(sql).fetchall() == every.sql(sql).fetchall()
        with pytest.raises(duckdb.CatalogException, match="images"):
            db.sql("SELECT * FROM images")


def test_the_rows_of_a_few_images_are_those_of_their_shard_files(instance_run):
    """tables_of_images reads each table's file of the images' shards (found in images): the
    rows are those a filter over each whole view gives."""
    from segflow.evaluation import tables_of_images

    with connect(str(instance_run)) as db:
        ids = [i for (i,) in db.sql("SELECT image_id FROM images ORDER BY uri").fetchall()]
        wanted = [ids[0], ids[-1], -1]  # one of each shard, and one not in the run
        found = tables_of_images(db, ["images", "masks", "errors"], wanted)
        for name, rows in found.items():
            expected = db.sql(
                f"SELECT * FROM {name} WHERE list_contains($ids, image_id)", params={"ids": wanted}
            )
            assert sorted(rows.to_pylist(), key=str) == sorted(
                expected.to_arrow_table().to_pylist(), key=str
            )
        assert found["images"].num_rows == 2 and found["masks"].num_rows > 2


def test_evaluate_lists_the_tables_it_reads_and_those_its_slice_names(instance_run):
    from segflow.evaluation import evaluate_run, evaluated_tables, open_run

    run = open_run(str(instance_run))
    metric = {"images", "coco_detections", "coco_ground_truth"}
    assert evaluated_tables(run, None) == metric
    where = (
        "image_id NOT IN (SELECT image_id FROM errors) AND image_id IN (SELECT image_id FROM masks)"
    )
    assert evaluated_tables(run, where) == metric | {"errors", "masks"}
    # The slice's subqueries read their tables: every image has masks and none failed.
    sliced, whole = evaluate_run(str(instance_run), where=where), evaluate_run(str(instance_run))
    assert sliced["where"] == where and sliced | {"where": None} == whole
