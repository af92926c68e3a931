"""SQL from users reads the run and nothing else: ``--where`` is one expression over
``images`` (library, CLI and the evaluate flow), and ``segflow query`` / ``connect`` run on
a connection that cannot reach the machine's files, extensions or settings. Every attempt
is refused with an error naming the option, and no secret ever appears in what is printed,
no file is written."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from segflow.analytics import connect
from segflow.cli import app
from segflow.evaluation import EvaluationError, evaluate_run

SEGFLOW = str(Path(sys.executable).with_name("segflow"))
REFUSED = "--where must be one boolean expression over images' columns"
READ_SECRET = "length((SELECT content FROM read_text('{secret}'))) > 0"
# A cast that fails prints the value it could not cast: the file, through the error message.
LEAK_SECRET = "(SELECT content FROM read_text('{secret}'))::INTEGER > 0"
COPY_OUT = "TRUE); COPY (SELECT * FROM images) TO '{target}'; SELECT * FROM images WHERE (TRUE"


@dataclass(frozen=True)
class Bait:
    """A secret file the SQL must not read, and a path it must not write."""

    secret: Path
    text: str
    target: Path

    def untouched(self, *printed: str) -> None:
        for output in printed:
            assert self.text not in output
        assert not self.target.exists()
        assert sorted(p.name for p in self.secret.parent.iterdir()) == ["secret.txt"]


@pytest.fixture
def bait(tmp_path: Path) -> Bait:
    folder = tmp_path / "bait"
    folder.mkdir()
    text = f"secret-{secrets.token_hex(8)}"
    secret = folder / "secret.txt"
    secret.write_text(text)
    return Bait(secret, text, folder / "written.csv")


def images_shard(run: Path) -> Path:
    return next(run.glob("run=*/images/*.parquet"))


# (where, the problem named), with {secret}, {target}, {folder} and {shard} filled in.
INJECTIONS = [
    (READ_SECRET, "read_text(...) is a table function"),
    (LEAK_SECRET, "read_text(...) is a table function"),
    ("(SELECT content FROM read_text('{secret}')) = 'x'", "read_text(...) is a table function"),
    ("EXISTS (SELECT * FROM read_text('{secret}'))", "read_text(...) is a table function"),
    (
        "(SELECT content::VARCHAR FROM read_blob('/proc/self/environ')) LIKE '%AWS%'",
        "read_blob(...) is a table function",
    ),
    ("EXISTS (SELECT * FROM read_parquet('{shard}'))", "read_parquet(...) is a table function"),
    ("EXISTS (SELECT * FROM read_csv('{secret}'))", "read_csv(...) is a table function"),
    ("EXISTS (SELECT * FROM glob('{folder}/*'))", "glob(...) is a table function"),
    ("EXISTS (SELECT * FROM query('SELECT 1'))", "query(...) is a table function"),
    ("EXISTS (SELECT * FROM '{secret}')", "is not a table of the run"),
    ("EXISTS (SELECT * FROM duckdb_settings())", "duckdb_settings(...) is a table function"),
    ("EXISTS (SELECT * FROM information_schema.tables)", "is not a table of the run"),
    (
        "EXISTS (WITH t AS (SELECT * FROM read_text('{secret}')) SELECT * FROM t)",
        "read_text(...) is a table function",
    ),
    ("getenv('AWS_SECRET_ACCESS_KEY') = 'x'", "getenv(...) is not a built-in function"),
    ("current_setting('secret_directory') = 'x'", "current_setting(...) reads the session"),
    ("pg_get_viewdef(1) = 'x'", "pg_get_viewdef(...) is a macro over more than its arguments"),
    ("main.lower(uri) = 'x'", "main.lower(...) is not a built-in function"),
    (COPY_OUT, "a statement other than SELECT follows it"),
    (
        "TRUE); /* a comment */ COPY images TO '{target}'; SELECT * FROM images WHERE (TRUE",
        "a statement other than SELECT follows it",
    ),
    ("TRUE\n); COPY images TO '{target}' --", "it does not parse"),
    ("TRUE); ATTACH '{target}' AS x; SELECT * FROM images WHERE (TRUE", "other than SELECT"),
    ("TRUE); INSTALL httpfs; LOAD httpfs; SELECT * FROM images WHERE (TRUE", "other than SELECT"),
    ("TRUE); PRAGMA enable_profiling; SELECT * FROM images WHERE (TRUE", "other than SELECT"),
    (
        "TRUE); SET enable_external_access = true; SELECT * FROM images WHERE (TRUE",
        "other than SELECT",
    ),
    (
        "TRUE); SELECT * FROM read_text('{secret}'); SELECT * FROM images WHERE (TRUE",
        "3 statements",
    ),
    ("TRUE) UNION ALL SELECT * FROM images WHERE (TRUE", "it is not one expression"),
    ("TRUE) ORDER BY (SELECT content FROM read_text('{secret}')", "it is not one expression"),
    ("TRUE; COPY images TO '{target}'", "it does not parse"),
    ("TRUE /* ", "it does not parse"),
    ("image_id = $1", "it has a parameter placeholder"),
    ("  ", "it is empty"),
]


def filled(where: str, bait: Bait, run: Path) -> str:
    return where.format(
        secret=bait.secret, target=bait.target, folder=bait.secret.parent, shard=images_shard(run)
    )


@pytest.mark.parametrize(("where", "problem"), INJECTIONS, ids=[w for w, _ in INJECTIONS])
def test_evaluate_refuses_a_where_that_is_not_one_expression_over_the_run(
    instance_run, bait, where, problem
):
    with pytest.raises(EvaluationError) as refused:
        evaluate_run(str(instance_run), where=filled(where, bait, instance_run))
    message = str(refused.value)
    assert message.startswith(REFUSED) and problem in message
    bait.untouched(message)


def test_a_where_in_comments_is_only_its_expression(instance_run, bait):
    # The comments hide a second statement from the parser: it is not run.
    hidden = filled(
        "TRUE /* ); COPY images TO '{target}'; -- */ -- ); COPY images TO '{target}'",
        bait,
        instance_run,
    )
    everything = evaluate_run(str(instance_run))
    assert evaluate_run(str(instance_run), where=hidden)["images"] == everything["images"]
    bait.untouched()


@pytest.mark.parametrize(
    "where",
    [
        "image_id <= (SELECT median(image_id) FROM images)",  # README's kind of slice
        "uri LIKE '%000000%1%' -- a comment after the expression",
        "EXISTS (SELECT 1 FROM images AS other WHERE other.image_id < images.image_id)",
        "coalesce(gt_uri, '') <> '' AND lower(status) IN ('ok')",
        "image_id IN (SELECT image_id FROM masks WHERE score > 0.5)",  # another of its tables
    ],
)
def test_a_slice_still_selects_what_the_same_sql_selects_on_the_parquet(instance_run, where):
    result = evaluate_run(str(instance_run), where=where)
    [run] = instance_run.glob("run=*")
    db = duckdb.connect()
    for name in ("images", "masks"):
        db.execute(f"CREATE VIEW {name} AS SELECT * FROM '{run}/{name}/*.parquet'")
    [(expected,)] = db.sql(f"SELECT count(*) FROM images WHERE {where}\n").fetchall()
    assert result["images"]["selected"] == expected > 0


def test_the_evaluate_command_refuses_and_prints_no_secret(instance_run, bait):
    where = filled(LEAK_SECRET, bait, instance_run)
    printed = CliRunner().invoke(app, ["evaluate", str(instance_run), "--where", where])
    assert printed.exit_code == 2
    assert REFUSED in " ".join(printed.output.split())
    bait.untouched(printed.output)
    copy = filled(COPY_OUT, bait, instance_run)
    printed = CliRunner().invoke(app, ["evaluate", str(instance_run), "--where", copy])
    assert printed.exit_code == 2 and "other than SELECT" in printed.output
    bait.untouched(printed.output)


def test_the_environment_stays_out_of_evaluate_and_query(instance_run):
    key = f"aws-secret-{secrets.token_hex(8)}"
    environment = os.environ | {"AWS_SECRET_ACCESS_KEY": key}
    leaks = {
        "evaluate": [
            "evaluate",
            str(instance_run),
            "--where",
            "(SELECT content::VARCHAR FROM read_blob('/proc/self/environ')) LIKE '%x%'",
        ],
        "query": [
            "query",
            str(instance_run),
            "SELECT content::VARCHAR FROM read_blob('/proc/self/environ')",
        ],
    }
    for command, args in leaks.items():
        done = subprocess.run(
            [SEGFLOW, *args], capture_output=True, text=True, env=environment, timeout=300
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert key not in done.stdout + done.stderr
        said = " ".join(done.stderr.split())
        assert (REFUSED if command == "evaluate" else "reaches outside the run's tables") in said


# --------------------------------------------------------------------------------------------
# segflow query and analytics.connect: any SQL, over the run's tables only.

ESCAPES = [
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_blob('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM '{secret}'",
    "SELECT * FROM read_parquet('{shard}')",
    "SELECT * FROM glob('{folder}/*')",
    "SELECT * FROM query('SELECT * FROM read_text(''{secret}'')')",
    "COPY (SELECT 1) TO '{target}'",
    "COPY masks TO '{target}' (FORMAT parquet)",
    "EXPORT DATABASE '{folder}/exported'",
    "ATTACH '{target}' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET lock_configuration = false",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_connect_reads_the_run_and_nothing_else(instance_run, bait, sql):
    with connect(str(instance_run)) as db:
        with pytest.raises(duckdb.Error) as refused:
            db.sql(filled(sql, bait, instance_run)).fetchall()
        # Whatever was tried, the connection is as it was: locked, and reading the run.
        assert db.sql("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
        [(masks,)] = db.sql("SELECT count(*) FROM masks").fetchall()
    assert masks == sum(
        pq.read_metadata(p).num_rows for p in instance_run.glob("run=*/masks/*.parquet")
    )
    bait.untouched(str(refused.value))


def test_connect_with_allow_external_is_duckdb_as_usual(instance_run, bait):
    with connect(str(instance_run), allow_external=True) as db:
        assert db.sql(f"SELECT content FROM read_text('{bait.secret}')").fetchall() == [
            (bait.text,)
        ]


@pytest.mark.parametrize(
    "sql", ["SELECT content FROM read_text('{secret}')", "COPY masks TO '{target}'"]
)
def test_query_refuses_to_leave_the_run_unless_allowed(instance_run, bait, sql):
    sql = filled(sql, bait, instance_run)
    printed = CliRunner().invoke(app, ["query", str(instance_run), sql])
    assert printed.exit_code == 2
    said = " ".join(printed.stderr.split())
    assert "the query failed: it reaches outside the run's tables" in said
    assert "--allow-external" in said
    bait.untouched(printed.output)

    printed = CliRunner().invoke(
        app, ["query", str(instance_run), sql, "--allow-external", "--format", "csv"]
    )
    assert printed.exit_code == 0, printed.output
    if sql.startswith("COPY"):
        assert bait.target.exists()
    else:
        assert printed.stdout == f"content\n{bait.text}\n"


# --------------------------------------------------------------------------------------------
# A connection that runs SELECT statements only reads a local run's files natively, by their
# paths, which DuckDB lets it write as well as read: segflow query gives it SQL of SELECT
# statements alone (segflow.sql.only_selects), any other SQL the read-only file system.


@pytest.mark.parametrize(
    ("sql", "admitted"),
    [
        ("SELECT count(*) FROM masks", True),
        ("WITH t AS (SELECT 1 AS x) SELECT * FROM t; FROM masks LIMIT 1", True),
        ("SHOW TABLES", True),
        ("DESCRIBE masks", True),
        ("SUMMARIZE masks", True),
        ("VALUES (1), (2)", True),
        ("(SELECT 1) UNION ALL (SELECT 2)", True),
        ("SELECT * FROM query('SELECT 1')", True),  # query() runs a SELECT alone
        ("", False),
        ("-- only a comment", False),
        ("SELEC 1", False),
        ("SELECT 1; COPY (SELECT 1) TO 'x.csv'", False),
        ("COPY masks TO 'x.csv'", False),
        ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", False),
        ("EXPLAIN SELECT 1", False),
        ("ATTACH 'x.db' AS x", False),
        ("DETACH x", False),
        ("EXPORT DATABASE 'x'", False),
        ("CREATE TABLE t AS SELECT 1", False),
        ("INSERT INTO t VALUES (1)", False),
        ("INSTALL httpfs", False),
        ("LOAD httpfs", False),
        ("PRAGMA enable_profiling", False),
        ("CALL pragma_version()", False),
        ("CHECKPOINT", False),
        ("SET threads = 1", False),
        ("PREPARE p AS SELECT 1; EXECUTE p", False),
    ],
)
def test_only_selects_admits_select_statements_alone(sql, admitted):
    from segflow.sql import only_selects

    assert only_selects(sql) is admitted


@pytest.fixture
def stray_run(instance_run: Path, tmp_path: Path) -> Path:
    """A copy of the instance run with a file in its masks folder that no commit added (a
    killed attempt's), holding one row more than the committed ones."""
    import shutil

    out = tmp_path / "stray"
    shutil.copytree(instance_run, out)
    committed = next(out.glob("run=*/masks/shard-000000-*.parquet"))
    rows = pq.read_table(committed)
    pq.write_table(rows.slice(0, 1), committed.with_name("shard-000000-0badf11e.parquet"))
    return out


def committed_masks(run: Path) -> int:
    from segflow.store import RunStore

    [folder] = run.glob("run=*")
    store = RunStore(str(run), folder.name.removeprefix("run="))
    return sum(pq.read_metadata(path).num_rows for path in store.files("masks"))


# Writes aimed at the run's own committed files (the paths a native connection may read),
# then reads of the machine's files: {committed} is a committed data file, {stray} the file
# no commit added.
WRITES = [
    "COPY (SELECT 1 AS x) TO '{committed}' (FORMAT parquet, USE_TMP_FILE false)",
    "COPY masks TO '{committed}' (FORMAT csv, USE_TMP_FILE false)",
    "COPY masks TO '{committed}'",
    "SELECT 1; COPY (SELECT 1 AS x) TO '{committed}' (FORMAT csv, USE_TMP_FILE false)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{committed}' (FORMAT csv, USE_TMP_FILE false)",
    "PREPARE p AS COPY (SELECT 1 AS x) TO '{committed}' (FORMAT csv, USE_TMP_FILE false); "
    "EXECUTE p",
    "ATTACH '{committed}' AS x",
    "ATTACH '{committed}' AS x; CREATE TABLE x.t AS SELECT 1",
    "ATTACH '{target}' AS x; CREATE TABLE x.t AS SELECT 1",
    "EXPORT DATABASE '{folder}/exported'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET allowed_directories = ['/']",
]
READS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('{secret}')",
    "SELECT content::VARCHAR FROM read_blob('/proc/self/environ')",
    "SELECT * FROM '{secret}'",
    "SELECT * FROM read_parquet('{stray}')",
    "SELECT count(*) FROM read_parquet('{masks}/*.parquet')",
    "SELECT * FROM glob('{masks}/*')",
    "SELECT * FROM glob('{folder}/*')",
    "SELECT * FROM query('SELECT * FROM read_text(''{secret}'')')",
]


def aimed(sql: str, bait: Bait, run: Path) -> str:
    [masks] = run.glob("run=*/masks")
    return sql.format(
        committed=next(masks.glob("shard-000001-*.parquet")),
        stray=next(masks.glob("shard-000000-0badf11e.parquet")),
        masks=masks,
        secret=bait.secret,
        target=bait.target,
        folder=bait.secret.parent,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sql", WRITES + READS)
def test_query_writes_nothing_and_reads_the_committed_files_alone(stray_run, bait, sql):
    before = snapshot(stray_run)
    printed = CliRunner().invoke(app, ["query", str(stray_run), aimed(sql, bait, stray_run)])
    assert printed.exit_code == 2, printed.output
    assert "the query failed" in " ".join(printed.stderr.split())
    assert snapshot(stray_run) == before
    bait.untouched(printed.output)


def test_a_native_connection_reads_the_committed_files_alone(stray_run, bait):
    sql = "SELECT class_name, count(*), sum(area) FROM masks GROUP BY 1 ORDER BY 1"
    with connect(str(stray_run)) as guarded, connect(str(stray_run), only_selects=True) as db:
        # Natively: no Python file system between DuckDB and the files.
        assert guarded.list_filesystems() and not db.list_filesystems()
        assert db.sql(sql).fetchall() == guarded.sql(sql).fetchall()
        [(masks,)] = db.sql("SELECT count(*) FROM masks").fetchall()
        for read in READS:
            with pytest.raises(duckdb.Error):
                db.sql(aimed(read, bait, stray_run)).fetchall()
    assert masks == committed_masks(stray_run)
    bait.untouched()


def test_segflow_query_of_selects_reads_natively_what_it_read_before(stray_run):
    sql = "SELECT class_name, count(*) AS n, sum(area) AS area FROM masks GROUP BY 1 ORDER BY 1"
    # The same answer from SQL of SELECT statements alone (read natively) and from the same
    # SELECT after a statement that is not one (read through the read-only file system).
    native = CliRunner().invoke(app, ["query", str(stray_run), sql, "--format", "csv"])
    guarded = CliRunner().invoke(
        app, ["query", str(stray_run), f"PRAGMA version; {sql}", "--format", "csv"]
    )
    assert native.exit_code == guarded.exit_code == 0, native.output + guarded.output
    assert native.stdout == guarded.stdout
    counted = [int(line.rsplit(",", 2)[1]) for line in native.stdout.splitlines()[1:]]
    assert sum(counted) == committed_masks(stray_run)


def test_a_locked_connection_still_scans_what_is_registered(tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as ds

    from segflow.sql import lock_down

    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "x.parquet")
    db = duckdb.connect()
    db.register("in_memory", pa.table({"y": [4, 5]}))
    db.register("on_disk", ds.dataset([str(tmp_path / "x.parquet")]))
    lock_down(db)
    db.register("after", pa.table({"z": [6]}))
    assert db.sql(
        "SELECT (SELECT sum(x) FROM on_disk), (SELECT sum(y) FROM in_memory), "
        "(SELECT sum(z) FROM after)"
    ).fetchall() == [(6, 9, 6)]
    with pytest.raises(duckdb.PermissionException):
        db.sql(f"SELECT * FROM '{tmp_path / 'x.parquet'}'").fetchall()


# --------------------------------------------------------------------------------------------
# The evaluate flow: its where parameter is checked before anything is read.


@pytest.mark.integration
def test_the_evaluate_flow_refuses_an_injected_where(prefect_harness, instance_run, bait):
    from pipelines.evaluate import evaluate

    where = filled(COPY_OUT, bait, instance_run)
    with pytest.raises(EvaluationError, match="other than SELECT"):
        evaluate(run=str(instance_run), where=where)
    bait.untouched()
    assert not list(instance_run.glob("run=*/evaluations"))
