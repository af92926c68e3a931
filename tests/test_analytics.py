"""docs/analytics.md runs: every DuckDB and Polars query in it, against real runs, checked
against independent computations (pycocotools on the counts, pyarrow on the Parquet, IoU
from the ground-truth label images); Spark's queries on a local pyspark, against DuckDB's
answers, and for the tables and columns they name. Then ``segflow query`` and ``segflow show``."""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from typer.testing import CliRunner

from segflow import decode, schema
from segflow.analytics import connect, register_functions, rle_area, rle_iou
from segflow.cli import app
from segflow.evaluation import evaluate_run
from tests.conftest import REPO_ROOT

SEGFLOW = str(Path(sys.executable).with_name("segflow"))
DOC = REPO_ROOT / "docs" / "analytics.md"
DOC_RUN = '"out/camvid"'  # the run the doc's setup blocks open; the tests substitute theirs
ENGINES = ("duckdb", "polars", "spark")
IGNORE_INDEX = 11  # CamVid's void label
SLOW = [pytest.mark.integration, pytest.mark.slow]  # the semantic run: Ray, Prefect, a model


def doc_blocks() -> dict[tuple[str, str], str]:
    """The doc's code blocks whose info string names an engine, by (engine, name)."""
    lines = DOC.read_text().splitlines()
    blocks: dict[tuple[str, str], str] = {}
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        info = lines[i][3:].split()
        end = lines.index("```", i + 1)
        if len(info) > 1 and info[1] in ENGINES:
            if len(info) != 3 or (info[1], info[2]) in blocks:
                raise ValueError(f"{DOC}:{i + 1}: expected a unique `LANGUAGE ENGINE NAME` info")
            blocks[(info[1], info[2])] = "\n".join(lines[i + 1 : end])
        i = end + 1
    return blocks


BLOCKS = doc_blocks()


# --------------------------------------------------------------------------------------------
# The runs.


@dataclass(frozen=True)
class SemanticRun:
    out: Path
    labels: Path
    truncated: Path  # fails to decode
    unlabelled: Path  # segmented, but has no ground truth


@pytest.fixture(scope="module")
def semantic_run(shared: Path, frames: list[Path], tmp_path_factory) -> SemanticRun:
    """CamVid frames in two folders (the slices), one truncated file and one frame without
    ground truth, segmented by the real command in shards of 4."""
    root = tmp_path_factory.mktemp("analytics")
    day, night = root / "input" / "day", root / "input" / "night"
    day.mkdir(parents=True)
    night.mkdir()
    for frame in frames[:4]:
        shutil.copy(frame, day / frame.name)
    for frame in frames[50:53]:
        shutil.copy(frame, night / frame.name)
    truncated, unlabelled = night / frames[60].name, night / "unlabelled_frame.png"
    truncated.write_bytes(frames[60].read_bytes()[:5000])
    shutil.copy(frames[61], unlabelled)
    labels = shared / "data" / "camvid_val" / "labels"
    out, log = root / "out", root / "segment.log"
    with log.open("w") as output:  # a file, not a pipe nobody reads while Ray and Prefect talk
        done = subprocess.run(
            [
                SEGFLOW,
                "segment",
                str(root / "input"),
                "--model",
                str(shared / "models" / "espnet_camvid.pt2"),
                "--gt",
                f"masks:{labels}",
                "--ignore-index",
                str(IGNORE_INDEX),
                "--shard-size",
                "4",
                "--out",
                str(out),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    assert done.returncode == 1, log.read_text()[-3000:]  # 1: some images failed, as planted
    return SemanticRun(out, labels, truncated, unlabelled)


@dataclass(frozen=True)
class InstanceRun:
    """conftest's ``instance_run``: jittered COCO ground truth as detections, in two shards."""

    out: Path


def read(out: Path, table: str) -> list[dict[str, Any]]:
    """A finished run's table, read with pyarrow alone (every shard file is committed)."""
    files = sorted(out.glob(f"run=*/{table}/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def coco_rle(row: dict[str, Any]) -> dict[str, Any]:
    return {"size": [row["height"], row["width"]], "counts": row["counts"]}


# --------------------------------------------------------------------------------------------
# Running the doc's blocks.


def setup(engine: str, out: Path, **given: Any) -> dict[str, Any]:
    code = BLOCKS[(engine, "setup")]
    assert DOC_RUN in code, f"the {engine} setup block no longer opens {DOC_RUN}"
    namespace: dict[str, Any] = dict(given)
    exec(compile(code.replace(DOC_RUN, repr(str(out))), f"{engine} setup", "exec"), namespace)
    return namespace


def run_block(engine: str, name: str, out: Path) -> list[dict[str, Any]]:
    namespace = setup(engine, out)
    code = BLOCKS[(engine, name)]
    if engine == "duckdb":
        with namespace["db"] as db:
            result = db.sql(code)
            return [dict(zip(result.columns, row, strict=True)) for row in result.fetchall()]
    # A Polars block is statements ending with the frame it computes, as in a notebook.
    *body, last = ast.parse(code).body
    assert isinstance(last, ast.Expr), f"polars {name} must end with an expression"
    exec(compile(ast.Module(body, type_ignores=[]), name, "exec"), namespace)
    return eval(compile(ast.Expression(last.value), name, "eval"), namespace).to_dicts()


def assert_rows(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same columns in the same order, same rows in the same order; floats to 1e-12."""
    assert expected, "an empty expectation checks nothing"
    assert len(actual) == len(expected), (actual[:3], expected[:3])
    for got, want in zip(actual, expected, strict=True):
        assert list(got) == list(want)
        for column, value in want.items():
            assert same(got[column], value), (column, got, want)


def same(got: Any, want: Any) -> bool:
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-12, abs=1e-12)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    return got == want


# --------------------------------------------------------------------------------------------
# What each query must give, computed without the code under test.

Verify = Callable[[list[dict[str, Any]], Any], None]  # (rows, SemanticRun | InstanceRun)


@dataclass(frozen=True)
class Check:
    runs: tuple[str, ...]
    verify: Verify


CHECKS: dict[str, Check] = {}


def check(*runs: str) -> Callable[[Verify], Verify]:
    def register(verify: Verify) -> Verify:
        CHECKS[verify.__name__.removeprefix("check_")] = Check(runs, verify)
        return verify

    return register


@check("semantic")
def check_class_area(rows, run: SemanticRun) -> None:
    pixels: dict[tuple, int] = defaultdict(int)
    sizes = {}
    for mask in read(run.out, "masks"):
        pixels[mask["image_id"], mask["uri"], mask["class_name"]] += int(
            coco_mask.decode(coco_rle(mask)).sum()
        )
        sizes[mask["image_id"]] = mask["height"] * mask["width"]
    expected = [
        {
            "image_id": image_id,
            "uri": uri,
            "class_name": name,
            "pixels": n,
            "fraction": n / sizes[image_id],
        }
        for (image_id, uri, name), n in pixels.items()
    ]
    expected.sort(key=lambda r: (r["image_id"], -r["pixels"], r["class_name"]))
    assert_rows(rows, expected)


@check("semantic", "instance")
def check_mask_measures(rows, run: SemanticRun | InstanceRun) -> None:
    masks = read(run.out, "masks")
    masks.sort(key=lambda m: (m["image_id"], m["class_id"], m["instance"] or 0))
    expected = [
        {
            "image_id": m["image_id"],
            "class_name": m["class_name"],
            "instance": m["instance"],
            "area": m["area"],
            "mask_area": int(coco_mask.area(coco_rle(m))),
            "bbox": m["bbox"],
            "mask_bbox": coco_mask.toBbox(coco_rle(m)).tolist(),
        }
        for m in masks
    ]
    assert_rows(rows, expected)
    if masks[0]["instance"] is None:  # semantic: the stored figures are the mask's own
        assert all(r["area"] == r["mask_area"] and r["bbox"] == r["mask_bbox"] for r in rows)


@check("semantic")
def check_mask_png(rows, run: SemanticRun) -> None:
    cars = [m for m in read(run.out, "masks") if m["class_name"] == "car"]
    cars = sorted(cars, key=lambda m: (-m["area"], m["image_id"]))[:3]
    assert_rows(
        [{k: v for k, v in r.items() if k != "png"} for r in rows],
        [{"image_id": m["image_id"], "class_name": "car", "area": m["area"]} for m in cars],
    )
    for row, mask in zip(rows, cars, strict=True):
        png = Image.open(io.BytesIO(row["png"]))
        assert (png.format, png.mode) == ("PNG", "1")
        np.testing.assert_array_equal(np.array(png), coco_mask.decode(coco_rle(mask)) == 1)


@check("instance")
def check_most_instances(rows, run: InstanceRun) -> None:
    confident = [m for m in read(run.out, "masks") if m["score"] >= 0.5]
    counted = Counter((m["image_id"], m["uri"]) for m in confident)
    classes = defaultdict(set)
    for m in confident:
        classes[m["image_id"]].add(m["class_name"])
    expected = [
        {"image_id": i, "uri": uri, "instances": n, "classes": len(classes[i])}
        for (i, uri), n in counted.items()
    ]
    expected = sorted(expected, key=lambda r: (-r["instances"], r["image_id"]))[:5]
    assert_rows(rows, expected)


@check("instance")
def check_duplicate_detections(rows, run: InstanceRun) -> None:
    groups = defaultdict(list)
    for m in read(run.out, "masks"):
        groups[m["image_id"], m["class_id"]].append(m)
    expected = []
    for detections in groups.values():
        for a in detections:
            for b in detections:
                if a["instance"] < b["instance"]:
                    iou = float(coco_mask.iou([coco_rle(a)], [coco_rle(b)], [0])[0][0])
                    if iou >= 0.5:
                        expected.append(
                            {
                                "image_id": a["image_id"],
                                "class_name": a["class_name"],
                                "kept": a["instance"],
                                "duplicate": b["instance"],
                                "iou": iou,
                            }
                        )
    expected.sort(key=lambda r: (-r["iou"], r["image_id"], r["kept"], r["duplicate"]))
    assert_rows(rows, expected)


def class_counts(run: SemanticRun) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Per evaluated image: intersection and union pixels per class, from its ground-truth
    label image and its prediction rebuilt from the masks with pycocotools."""
    predictions: dict[tuple[int, str], np.ndarray] = {}
    for m in read(run.out, "masks"):
        key = (m["image_id"], m["uri"])
        labels = predictions.setdefault(key, np.full((m["height"], m["width"]), -1))
        labels[coco_mask.decode(coco_rle(m)) == 1] = m["class_id"]
    counts = {}
    for (image_id, uri), predicted in predictions.items():
        label_file = run.labels / Path(uri).name
        if not label_file.exists():
            continue
        truth = np.array(Image.open(label_file), dtype=np.int64)
        valid = truth != IGNORE_INDEX
        classes = np.arange(IGNORE_INDEX)[:, None]
        gt, pred = (truth[valid] == classes), (predicted[valid] == classes)
        counts[image_id, uri] = ((gt & pred).sum(1), (gt | pred).sum(1))
    return counts


@check("semantic")
def check_worst_images(rows, run: SemanticRun) -> None:
    mious = {
        key: float(np.mean(inter[union > 0] / union[union > 0]))
        for key, (inter, union) in class_counts(run).items()
    }
    worst = sorted(mious, key=lambda key: (mious[key], key[0]))[:3]
    masks = read(run.out, "masks")
    expected = []
    for image_id, uri in worst:
        found = [
            {
                "image_id": image_id,
                "uri": uri,
                "miou": mious[image_id, uri],
                "class_name": m["class_name"],
                "area": int(coco_mask.decode(coco_rle(m)).sum()),
            }
            for m in masks
            if m["image_id"] == image_id
        ]
        expected += sorted(found, key=lambda r: (-r["area"], r["class_name"]))
    assert_rows(rows, expected)


@check("semantic")
def check_slice_miou(rows, run: SemanticRun) -> None:
    sums: dict[str, list[np.ndarray]] = {}
    for (_, uri), (inter, union) in class_counts(run).items():
        folder = uri.rsplit("/", 1)[0]
        if folder in sums:
            sums[folder] = [sums[folder][0] + inter, sums[folder][1] + union]
        else:
            sums[folder] = [inter, union]
    expected = []
    for folder, (inter, union) in sorted(sums.items()):
        present = union > 0
        miou = float(np.mean(inter[present] / union[present]))
        expected.append({"folder": folder, "miou": miou, "classes": int(present.sum())})
    assert [Path(r["folder"]).name for r in expected] == ["day", "night"]
    assert_rows(rows, expected)
    # The exact way is segflow evaluate's, slice by slice.
    for row in expected:
        where = f"starts_with(uri, '{row['folder']}/')"
        assert evaluate_run(str(run.out), where=where)["semantic"]["miou"] == pytest.approx(
            row["miou"], rel=1e-12
        )


@check("semantic")
def check_errors_by_stage(rows, run: SemanticRun) -> None:
    decode_errors = {c.__name__ for c in vars(decode).values() if _is_decode_error(c)}
    assert [(r["stage"], r["errors"], r["example"]) for r in rows] == [
        ("decode", 1, run.truncated.as_uri()),
        ("gt", 1, run.unlabelled.as_uri()),
    ]
    assert rows[0]["error_type"] in decode_errors
    assert rows[1]["error_type"] == "GroundTruthError"
    assert len(read(run.out, "errors")) == 2


def _is_decode_error(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, decode.ImageDecodeError)


@check("semantic")
def check_throughput(rows, run: SemanticRun) -> None:
    minutes: dict[datetime, list[dict]] = defaultdict(list)
    for image in read(run.out, "images"):
        minutes[image["processed_at"].replace(second=0, microsecond=0)].append(image)
    stages = ("read_ms", "decode_ms", "infer_ms", "encode_ms")
    expected = []
    for minute, images in sorted(minutes.items()):
        timed = [sum(i[s] for s in stages) for i in images if all(i[s] is not None for s in stages)]
        expected.append(
            {
                "minute": minute,
                "images": len(images),
                "failed": sum(i["status"] == "error" for i in images),
                "ms_per_image": sum(timed) / len(timed),
            }
        )
    assert sum(r["images"] for r in expected) == 9
    assert_rows(rows, expected)
    assert all(r["minute"].utcoffset().total_seconds() == 0 for r in rows)


# --------------------------------------------------------------------------------------------
# The doc's blocks, every one.


def test_every_query_of_the_doc_has_a_block_per_engine_and_a_check():
    for engine in ENGINES:
        assert (engine, "setup") in BLOCKS
        names = {name for (e, name) in BLOCKS if e == engine and name != "setup"}
        assert names == set(CHECKS), engine


def block_cases(engine: str) -> list:
    return [
        pytest.param(
            engine,
            name,
            kind,
            id=f"{engine}-{name}-{kind}",
            marks=SLOW if kind == "semantic" else [],
        )
        for name, spec in sorted(CHECKS.items())
        for kind in spec.runs
    ]


@pytest.mark.parametrize(("engine", "name", "kind"), block_cases("duckdb") + block_cases("polars"))
def test_the_doc_query_gives_what_independent_code_computes(engine, name, kind, request):
    found = request.getfixturevalue(f"{kind}_run")
    run = found if kind == "semantic" else InstanceRun(found)
    CHECKS[name].verify(run_block(engine, name, run.out), run)


# Spark: the tables and columns each query names must exist in segflow.schema.

# The Spark SQL keywords the queries use, type names included (CAST(x AS BIGINT)).
KEYWORDS = """select from where group by order desc asc limit join on and or not as with is null
    cast bigint double int distinct inner left right outer having case when then else end in
    like between true false"""
SQL_WORDS = set(KEYWORDS.split())
TOKEN = re.compile(r"`(?P<quoted>[^`]+)`|(?P<word>[A-Za-z_]\w*)|(?P<other>\S)")


def unknown_names(sql: str) -> list[str]:
    """The identifiers of a Spark SQL query that are neither keywords, nor tables of
    segflow.schema (or the query's CTEs), nor columns of the tables it reads (or aliases it
    defines); qualified columns must belong to their table."""
    sql = re.sub(r"--[^\n]*", " ", sql)
    sql = re.sub(r"'(?:[^']|'')*'", " 0 ", sql)
    tokens = []
    for match in TOKEN.finditer(sql):
        if match["quoted"]:
            tokens.append(("name", match["quoted"]))
        elif match["word"] and match["word"].lower() not in SQL_WORDS:
            tokens.append(("name", match["word"]))
        else:
            tokens.append(("word", (match["word"] or match["other"]).lower()))

    def at(i: int) -> tuple[str, str]:
        return tokens[i] if 0 <= i < len(tokens) else ("word", "")

    ctes, aliases, table_of = set(), set(), {}
    for i, (kind, text) in enumerate(tokens):
        if kind != "name":
            continue
        if at(i + 1) == ("word", "as") and at(i + 2) == ("word", "("):
            ctes.add(text)
        elif at(i - 1) == ("word", "as"):
            aliases.add(text)
        elif at(i - 1)[1] in ("from", "join"):
            table_of[text] = text
            if at(i + 1)[0] == "name":
                table_of[at(i + 1)[1]] = text
    read_tables = {t for t in table_of.values() if t in schema.TABLES}
    columns = {c for t in read_tables for c in schema.TABLES[t].names}

    problems = []
    for i, (kind, text) in enumerate(tokens):
        if kind != "name" or at(i + 1) == ("word", "(") or text in aliases | ctes:
            continue
        if at(i - 1) == ("word", "."):
            qualifier = table_of.get(at(i - 2)[1])
            # A CTE's columns are columns of the tables it reads, or aliases it defines.
            known = schema.TABLES[qualifier].names if qualifier in schema.TABLES else None
            if text not in (known if known is not None else aliases | columns):
                problems.append(f"{at(i - 2)[1]}.{text}")
        elif at(i - 1)[1] in ("from", "join"):
            if text not in schema.TABLES and text not in ctes:
                problems.append(f"table {text}")
        elif text in table_of or text in columns:
            continue
        else:
            problems.append(text)
    return problems


@pytest.fixture(scope="module")
def spark():
    """One local Spark session for the module (pyspark's own, one core)."""
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime (`make java` installs a headless JRE)")
    import os

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # its UDFs need pycocotools
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.mark.parametrize(("engine", "name", "kind"), block_cases("spark"))
def test_the_spark_query_gives_what_duckdb_gives(engine, name, kind, spark, request):
    found = request.getfixturevalue(f"{kind}_run")
    out = found.out if kind == "semantic" else found
    setup(engine, out, spark=spark)
    rows = [
        {column: aware(value) for column, value in row.asDict(recursive=True).items()}
        for row in spark.sql(BLOCKS[engine, name]).collect()
    ]
    assert_rows(rows, run_block("duckdb", name, out))


def aware(value: Any) -> Any:
    """pyspark hands timestamps over as naive datetimes of the local time zone."""
    return value.astimezone(UTC) if isinstance(value, datetime) and value.tzinfo is None else value


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_spark_query_names_only_existing_tables_and_columns(name):
    assert unknown_names(BLOCKS["spark", name]) == []


def test_the_name_check_catches_what_spark_would_not_find():
    assert unknown_names("SELECT procesed_at FROM images") == ["procesed_at"]
    assert unknown_names("SELECT stage FROM images") == ["stage"]
    assert unknown_names("SELECT i.stage FROM images i") == ["i.stage"]
    assert unknown_names("SELECT uri FROM mask") == ["uri", "table mask"]
    assert unknown_names("SELECT sum(`union`) AS u FROM class_stats ORDER BY u") == []


def test_the_spark_setup_reads_existing_tables_and_registers_every_mask_function():
    code = BLOCKS["spark", "setup"]
    tree = ast.parse(code)
    [loop] = [node for node in tree.body if isinstance(node, ast.For)]
    assert set(ast.literal_eval(loop.iter)) <= set(schema.TABLES)
    registered = {
        call.args[0].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "spark.udf.register"
    }
    db = duckdb.connect()
    register_functions(db)
    in_duckdb = {
        name
        for (name,) in db.sql(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_name LIKE 'rle_%'"
        ).fetchall()
    }
    db.close()
    used = {f for name in CHECKS for f in re.findall(r"\b(rle_\w+)\(", BLOCKS["spark", name])}
    assert used <= registered == in_duckdb == {"rle_area", "rle_bbox", "rle_iou", "rle_png"}


# --------------------------------------------------------------------------------------------
# The functions beyond the doc: every pair, NULLs, bad counts.


def test_rle_iou_equals_pycocotools_on_every_pair_of_detections_of_an_image(instance_run):
    with connect(str(instance_run)) as db:
        pairs = db.sql(
            "SELECT a.counts, b.counts, a.height, a.width, "
            "rle_iou(a.counts, b.counts, a.height, a.width) FROM masks a JOIN masks b "
            "ON a.image_id = b.image_id"
        ).fetchall()
    expected = [
        coco_mask.iou([{"size": [h, w], "counts": a}], [{"size": [h, w], "counts": b}], [0])[0][0]
        for a, b, h, w, _ in pairs
    ]
    assert len(pairs) > 500
    assert 0 < sum(0 < e < 1 for e in expected) < len(pairs)  # overlaps, partial and none
    assert [row[4] for row in pairs] == expected


def test_a_null_argument_gives_null_and_bad_counts_name_the_problem(instance_run):
    import polars as pl

    with connect(str(instance_run)) as db:
        assert db.sql("SELECT rle_area(NULL, 2, 2), rle_iou('4', NULL, 2, 2)").fetchall() == [
            (None, None)
        ]
        with pytest.raises(duckdb.Error, match="invalid character 'z'"):
            db.sql("SELECT rle_area('z', 2, 2)").fetchall()
        with pytest.raises(duckdb.Error, match=r"counts sum to 3, expected h\*w = 2\*2 = 4"):
            db.sql("SELECT rle_bbox('3', 2, 2)").fetchall()
    frame = pl.DataFrame({"counts": ["13", None], "height": [2, 2], "width": [2, 2]})
    # "13": one zero, then three ones, in column-major order.
    assert frame.select(rle_area(), rle_iou("counts", "counts")).rows() == [(3, 1.0), (None, None)]


# --------------------------------------------------------------------------------------------
# segflow query


def query(*args: str):
    return CliRunner().invoke(app, ["query", *args])


def said(printed) -> str:
    """What the command wrote to stderr, as one line (the console wraps it)."""
    return " ".join(printed.stderr.split())


@pytest.mark.integration
@pytest.mark.slow
def test_query_prints_csv_json_and_a_table(semantic_run: SemanticRun):
    run = str(semantic_run.out)
    images = read(semantic_run.out, "images")

    printed = query(
        run, "SELECT status, count(*) AS n FROM images GROUP BY 1 ORDER BY 1", "--format", "csv"
    )
    assert printed.exit_code == 0, printed.output
    statuses = Counter(i["status"] for i in images)
    assert list(csv.reader(io.StringIO(printed.stdout))) == [
        ["status", "n"],
        *([s, str(n)] for s, n in sorted(statuses.items())),
    ]

    printed = query(
        run,
        "SELECT m.image_id, m.class_name, i.processed_at, rle_bbox(m.counts, m.height, m.width) "
        "AS box, rle_png(m.counts, m.height, m.width) AS png FROM masks m JOIN images i "
        "ON m.image_id = i.image_id ORDER BY m.image_id, m.class_id LIMIT 4",
        "--format",
        "json",
    )
    assert printed.exit_code == 0, printed.output
    rows = json.loads(printed.stdout)
    masks = {(m["image_id"], m["class_name"]): m for m in read(semantic_run.out, "masks")}
    finished = {i["image_id"]: i["processed_at"] for i in images}
    assert len(rows) == 4
    for row in rows:
        mask = masks[row["image_id"], row["class_name"]]
        assert row["box"] == coco_mask.toBbox(coco_rle(mask)).tolist()
        assert datetime.fromisoformat(row["processed_at"]) == finished[row["image_id"]]
        png = Image.open(io.BytesIO(base64.b64decode(row["png"])))
        np.testing.assert_array_equal(np.array(png), coco_mask.decode(coco_rle(mask)) == 1)

    printed = query(run, "SELECT class_name, count(*) AS images FROM masks GROUP BY 1")
    assert printed.exit_code == 0, printed.output
    for name in {m["class_name"] for m in masks.values()}:
        assert name in printed.stdout


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("SELECT nosuch FROM masks", 'column "nosuch" not found'),
        ("SELEC * FROM masks", 'syntax error at or near "SELEC"'),
        ("SELECT * FROM maskz", "maskz does not exist"),
        ("SELECT rle_area(counts) FROM masks", "rle_area"),
    ],
)
def test_query_names_what_is_wrong_with_bad_sql(instance_run, sql, problem):
    printed = query(str(instance_run), sql)
    assert printed.exit_code == 2
    assert "the query failed" in said(printed) and problem in said(printed)
    assert printed.stdout == ""


def test_query_refuses_a_folder_without_a_run_and_an_unknown_format(instance_run, tmp_path):
    printed = query(str(tmp_path), "SELECT 1")
    assert printed.exit_code == 2 and "expected one run folder" in said(printed)
    printed = query(str(instance_run), "SELECT 1", "--format", "xml")
    assert printed.exit_code == 2 and "--format must be table, csv or json" in said(printed)


# --------------------------------------------------------------------------------------------
# segflow show


def show(run: Path, image_id: int, out: Path, *options: str) -> np.ndarray:
    printed = CliRunner().invoke(
        app, ["show", str(run), str(image_id), "--out", str(out), *options]
    )
    assert printed.exit_code == 0, printed.output
    with Image.open(out) as picture:
        assert (picture.format, picture.mode) == ("PNG", "RGB")
        return np.array(picture)


def image_and_masks(out: Path, image_id: int) -> tuple[np.ndarray, list[np.ndarray]]:
    [image] = [i for i in read(out, "images") if i["image_id"] == image_id]
    pixels = np.array(Image.open(image["uri"].removeprefix("file://")).convert("RGB"))
    masks = sorted(
        (m for m in read(out, "masks") if m["image_id"] == image_id),
        key=lambda m: m["instance"] if m["instance"] is not None else m["class_id"],
    )
    return pixels, [coco_mask.decode(coco_rle(m)).astype(bool) for m in masks]


@pytest.mark.integration
@pytest.mark.slow
def test_show_paints_each_class_in_one_colour_blended_by_alpha(semantic_run, tmp_path):
    images = [i for i in read(semantic_run.out, "images") if i["status"] == "ok"]
    image_id = max(images, key=lambda i: i["num_masks"])["image_id"]
    pixels, masks = image_and_masks(semantic_run.out, image_id)
    opaque = show(semantic_run.out, image_id, tmp_path / "a1.png", "--alpha", "1", "--no-legend")
    half = show(semantic_run.out, image_id, tmp_path / "a05.png", "--no-legend")
    clear = show(semantic_run.out, image_id, tmp_path / "a0.png", "--alpha", "0", "--no-legend")
    legend = show(semantic_run.out, image_id, tmp_path / "legend.png")

    assert opaque.shape == pixels.shape
    np.testing.assert_array_equal(clear, pixels)
    colours = []
    for mask in masks:
        [colour] = np.unique(opaque[mask], axis=0)  # one colour per class
        colours.append(tuple(colour))
    assert len(set(colours)) == len(masks) > 5
    assert np.sum(masks, axis=0).min() == 1  # a semantic prediction covers every pixel once
    expected = (pixels.astype(float) + opaque) / 2
    assert np.abs(half - expected).max() <= 0.5
    assert (half != pixels).any(axis=2).mean() > 0.9
    # The legend sits in the top-left corner and changes nothing else.
    changed = np.argwhere((legend != half).any(axis=2))
    assert changed.size and changed.min(axis=0).tolist() == [0, 0]
    bottom, right = changed.max(axis=0)
    assert (bottom + 1) * (right + 1) < 0.25 * pixels.shape[0] * pixels.shape[1]


def test_show_draws_detections_with_boxes_and_keeps_unmasked_pixels(instance_run, tmp_path):
    images = read(instance_run, "images")
    image_id = max(images, key=lambda i: i["num_masks"])["image_id"]
    pixels, masks = image_and_masks(instance_run, image_id)
    opaque = show(instance_run, image_id, tmp_path / "a1.png", "--alpha", "1")
    half = show(instance_run, image_id, tmp_path / "a05.png")
    clear = show(instance_run, image_id, tmp_path / "a0.png", "--alpha", "0")

    assert opaque.shape == pixels.shape
    masked = np.any(masks, axis=0)
    # Outside the masks alpha changes nothing: only the boxes and labels are drawn there.
    np.testing.assert_array_equal(half[~masked], clear[~masked])
    np.testing.assert_array_equal(opaque[~masked], clear[~masked])
    drawn = (clear != pixels).any(axis=2)
    assert 0.005 < drawn.mean() < 0.3
    # Each detection in its own colour, a better one over a worse one: the part of a detection
    # that no better detection, box or label covers is in its colour alone.
    colours, above = [], np.zeros_like(masked)
    for mask in masks:
        visible = mask & ~above & ~drawn
        above |= mask
        if visible.any():
            [colour] = np.unique(opaque[visible], axis=0)
            colours.append(tuple(colour))
            assert (half[visible] != pixels[visible]).any(axis=1).mean() > 0.9
    assert len(set(colours)) == len(colours) > 5


def test_show_refuses_an_unknown_image_id(instance_run, tmp_path):
    printed = CliRunner().invoke(
        app, ["show", str(instance_run), "12345", "--out", str(tmp_path / "x.png")]
    )
    assert printed.exit_code == 2
    assert "has no image with id 12345" in said(printed)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# Reading a run: views over exactly the committed files, scanned as queries need them.


def test_the_views_read_the_committed_shards_only(instance_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(instance_run, out)
    [run] = out.glob("run=*")
    committed = {name: read(out, name) for name in schema.TABLES}
    # A shard killed before its driver committed it: its files are there, and do not count.
    for name in schema.TABLES:
        [first, *_] = sorted((run / name).glob("shard-000000-*.parquet"))
        shutil.copy(first, run / name / "shard-000007-0badf11e.parquet")
    with connect(str(out)) as db:
        for name, rows in committed.items():
            assert db.sql(f"SELECT count(*) FROM {name}").fetchall() == [(len(rows),)]
    assert evaluate_run(str(out)) == evaluate_run(str(instance_run)) | {"run": f"file://{run}"}


@pytest.mark.integration
def test_a_run_on_s3_is_read_through_the_locked_connection(instance_run, s3_env, monkeypatch):
    import fsspec

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("analytics-test")
    fs.put(f"{instance_run}/", "analytics-test/out/", recursive=True)
    s3_run = "s3://analytics-test/out"
    with connect(s3_run) as db:
        [(masks,)] = db.sql("SELECT count(*) FROM masks").fetchall()
        with pytest.raises(duckdb.Error):  # DuckDB itself still reaches nothing
            db.sql(f"SELECT count(*) FROM '{s3_run}/run=inst/masks/*.parquet'").fetchall()
    assert masks == len(read(instance_run, "masks"))
    where = "image_id IN (SELECT image_id FROM masks WHERE score > 0.5)"
    local, remote = evaluate_run(str(instance_run), where=where), evaluate_run(s3_run, where=where)
    assert remote["instance"] == local["instance"]
    assert remote["images"] == local["images"]


def test_reading_a_run_imports_no_torch(instance_run):
    code = (
        "import sys\n"
        "from segflow.analytics import connect\n"
        f"print(connect({str(instance_run)!r}).sql('SELECT count(*) FROM masks').fetchall())\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.splitlines() == [f"[({len(read(instance_run, 'masks'))},)]", "[]"]
