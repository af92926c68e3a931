"""segflow at the scale of millions of images, measured (a benchmark, not a timed test).

Two parts, both by default (``--only`` picks one); every measurement is a fresh process,
its peak RSS its VmHWM (``/proc/self/status``) and its time the wall time around it.

``--only planning``: the driver's peak RSS and wall time planning a run of N URIs, with this
checkout's segflow and a baseline's (``--baseline REV``, default 9069dc0: the last commit
before manifests streamed, checked out into a temporary git worktree) side by side,
each in a fresh process. Planning is what the ``segment`` flow's driver does with the
manifest: build it from the input, copy it into the run folder, cut it into shards of 256,
then hand every shard's URIs to the actors (read here one shard after another, as
``run_shards`` asks for them). The inputs, in a shuffled order:

* manifest files (``.txt``, ``.parquet``) of 1 M and 10 M URIs of about 60 characters;
* local folders of 400 k and 2 M empty files (1,000 a folder), listed; a 10 M-file folder
  would take most of the disk's inodes here, so the baseline's per-URI growth between the
  two is extrapolated to 10 M (an estimate, not a measurement). This checkout's listing
  holds a page at a time; what grows is DuckDB's sort, up to its budget, then it spills.

Goal: planning 10 M URIs within 1 GB. The inputs are made once under ``--work`` and reused.
S3 listings are not measured here (a moto server lists far slower than S3); they are read a
page of 1,000 keys at a time and arrive sorted, so they skip the sort a local folder needs.

``--only queries``: the commands that read a finished run, on a semantic run of N images
(``--images``, default 100 k) on local disk, each beside DuckDB reading the same committed
files directly (``read_parquet('RUN/<table>/*.parquet')`` in a fresh ``python -c``) and
computing the same answer, which is checked (``!=`` in the table where they differ):

=================================  ========================================================
segflow                            DuckDB direct
=================================  ========================================================
``query`` count and total area     the same SQL over the files
``query`` area by class            the same SQL
``query`` the 10 worst images      the same SQL
``evaluate --json``                class_stats' counts summed by class, confusion's cells
                                   summed; mIoU from the sums (compared)
``evaluate --where`` (10 %)        the same over the images ``image_id % 10 = 0`` selects
``report``                         the figures above, the 12 worst images and their masks
                                   (their URIs must all be in the page, every one drawn)
``show`` one image                 that image's URI and masks (their size must be the PNG's)
=================================  ========================================================

The run is synthesised, not segmented: the CamVid validation frames (:data:`SEED_FRAMES`,
all 101 of them) are segmented once, in process, with the exported ESPNet and their label
maps as ground truth (``segflow.shard.segment_images``, so every table holds real rows: RLE
strings, class_stats, confusion cells, per-image figures), and those rows are repeated under
new URIs, copy ``c`` of frame ``F`` being ``frames/copy-<c>/F`` (a symbolic link to the
frame, so that ``report`` and ``show`` read and draw real images, and the label maps, found
by file name, still apply), and new image ids (:func:`segflow.schema.image_id_for` of the
URI). Shards of 256 are committed with :meth:`segflow.store.RunStore.commit_shard` after
``run.json``, ``evaluation.json`` and the manifest, as the ``segment`` flow writes them, and
the run is finished with its ``summary.json``; it is made once under ``--work`` and reused.
The worst images are then copies of the worst frame (ties go by URI). A frame's strings
repeat about 2.5 times a shard, so Parquet's dictionaries make the files smaller than a
real run's.

Goals at 1 M images: each command within 2x DuckDB direct's time and 1 GB of peak RSS, and
flat from 100 k to 1 M (at most 1.2x growth, printed when two sizes are measured); ``report``
within 30 s. The table marks each goal met (``ok``) or not (``MISS``) at every size measured.
segflow's commands read the run through :meth:`segflow.evaluation.Run.connect`: DuckDB's
``read_parquet`` over the committed files, through a read-only file system (see
:mod:`segflow.sql`), so the ratio is mostly that file system's Python calls and the
interpreter's start. Not measured yet: the same after ``compact``, an instance run
(``export-coco``), and a run on an S3 endpoint.

Usage: .venv/bin/python bench/scale.py [--only planning|queries] [--work DIR]
       [--baseline REV] [--images N [N ...]]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 256
MANIFEST_SIZES = (1_000_000, 10_000_000)
FOLDER_SIZES = (400_000, 2_000_000)

# Each child prints: URIs, shards, seconds, VmHWM in KiB. VmHWM, not ru_maxrss: Linux carries
# ru_maxrss across exec, so a child forked from a large process would report the parent's.
_CHILD_END = """
seconds = time.perf_counter() - started
hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
print(images, len(all_shards), seconds, hwm)
"""

# The planning before manifests streamed (BASELINE_REV): one Arrow array in the driver.
BASELINE_REV = "9069dc0"
BASELINE = """
import re, sys, time
from segflow.manifest import build_manifest, shards
from segflow.store import RunStore
started = time.perf_counter()
store = RunStore(sys.argv[2], "bench")
manifest = build_manifest(sys.argv[1])
store.prepare({"shard_size": 256})
store.write_manifest(manifest)
images = len(manifest)
all_shards = list(shards(images, 256))
for shard in all_shards:
    manifest.slice(shard.start, len(shard)).to_pylist()
"""

CURRENT = """
import os, re, sys, tempfile, time
from segflow.manifest import build_manifest, shards
from segflow.store import RunStore
started = time.perf_counter()
store = RunStore(sys.argv[2], "bench")
with tempfile.TemporaryDirectory() as tmp:
    build_manifest(sys.argv[1], os.path.join(tmp, "manifest.parquet"))
    store.prepare({"shard_size": 256})
    store.put_manifest(os.path.join(tmp, "manifest.parquet"))
with store.open_manifest() as manifest:
    images = len(manifest)
    all_shards = list(shards(images, 256))
    for shard in all_shards:
        manifest.uris(shard)
"""


def uri(i: int) -> str:
    return f"s3://segflow-corpus/images/tile-{i // 1000:05d}/frame-{i:08d}.jpg"


def manifest_files(work: Path, count: int) -> tuple[Path, Path]:
    """A .txt and a .parquet manifest of ``count`` URIs in a shuffled order."""
    txt, parquet = work / f"manifest-{count}.txt", work / f"manifest-{count}.parquet"
    if txt.exists() and parquet.exists():
        return txt, parquet
    order = list(range(count))
    random.Random(0).shuffle(order)
    with (
        open(f"{txt}.tmp", "w") as lines,
        pq.ParquetWriter(f"{parquet}.tmp", pa.schema([("uri", pa.string())])) as table,
    ):
        for start in range(0, count, 1_000_000):
            uris = [uri(i) for i in order[start : start + 1_000_000]]
            lines.write("\n".join(uris) + "\n")
            table.write_table(pa.table({"uri": pa.array(uris, pa.string())}))
    os.replace(f"{txt}.tmp", txt)
    os.replace(f"{parquet}.tmp", parquet)
    return txt, parquet


def image_folder(work: Path, count: int) -> Path:
    """A folder of ``count`` empty .jpg files, 1,000 a subfolder."""
    root = work / f"folder-{count}"
    if (root / "done").exists():
        return root
    for i in range(count):
        folder = root / f"tile-{i // 1000:05d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"frame-{i:08d}.jpg").touch()
    (root / "done").touch()
    return root


def plan(code: str, checkout: Path, location: Path) -> tuple[int, float, float]:
    """URIs planned, seconds, peak RSS (MiB) of a fresh process planning ``location``."""
    with tempfile.TemporaryDirectory() as out:
        output = subprocess.run(
            [sys.executable, "-c", code + _CHILD_END, str(location), out],
            capture_output=True,
            text=True,
            cwd=checkout,  # python -c puts the working folder first on the path
            env={**os.environ, "PYTHONPATH": str(checkout)},
        )
    if output.returncode:
        raise RuntimeError(f"planning {location} with {checkout} failed:\n{output.stderr}")
    images, _, seconds, hwm_kib = output.stdout.splitlines()[-1].split()
    return int(images), float(seconds), int(hwm_kib) / 1024


def planning(work: Path, baseline: Path) -> None:
    print(f"planning: driver peak RSS and seconds; baseline {baseline}, this {REPO_ROOT}")
    print(f"  {'input':<34} {'baseline':>22}   {'this checkout':>22}")
    checkouts = ((BASELINE, baseline), (CURRENT, REPO_ROOT))

    def row(label: str, measured: list[tuple[int, float, float]]) -> None:
        cells = "   ".join(f"{rss:7.0f} MiB {seconds:7.1f} s" for _, seconds, rss in measured)
        print(f"  {label:<34} {cells}", flush=True)

    for count in MANIFEST_SIZES:
        for path in manifest_files(work, count):
            measured = [plan(code, checkout, path) for code, checkout in checkouts]
            assert {images for images, _, _ in measured} == {count}
            row(f"{path.suffix} manifest, {count:,} URIs", measured)
    by_size = {}
    for count in FOLDER_SIZES:
        folder = image_folder(work, count)
        by_size[count] = [plan(code, checkout, folder) for code, checkout in checkouts]
        assert {images for images, _, _ in by_size[count]} == {count}
        row(f"folder of {count:,} files", by_size[count])
    # The baseline grows by a dict per file; extrapolated linearly. This checkout's growth
    # is DuckDB's sort filling its budget (SORT_MEMORY), past which it spills to disk: the
    # 10 M manifest files above (the same DuckDB, grouping) show where it levels off.
    small, large = FOLDER_SIZES
    a, b = by_size[small][0], by_size[large][0]
    per_uri = [(b[i] - a[i]) / (large - small) for i in (1, 2)]
    growth = 10_000_000 - large
    print(
        f"  {'folder of 10,000,000 files':<34} "
        f"{b[2] + per_uri[1] * growth:7.0f} MiB {b[1] + per_uri[0] * growth:7.1f} s"
        "   (baseline extrapolated linearly)"
    )
    print("  goal: planning 10 M URIs within 1 GB (1024 MiB)")


# --------------------------------------------------------------------------------------------
# queries: a synthesised semantic run, read by segflow's commands and by DuckDB directly.

SHARED = Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared"))
FRAMES = SHARED / "data" / "camvid_val" / "images"
MODEL = SHARED / "models" / "espnet_camvid.pt2"
GT = f"masks:{SHARED / 'data' / 'camvid_val' / 'labels'}"
IGNORE_INDEX = 11
SEED_FRAMES = 101  # all the CamVid validation frames here: each repeats ~2.5 times a shard
RUN_ID = "bench"
QUERY_SIZES = (100_000,)
RSS_GOAL_MIB = 1024
RATIO_GOAL = 2.0
REPORT_GOAL_S = 30.0

# The segflow command in a fresh process; it prints its VmHWM (KiB) last, on stderr, as it
# exits (typer ends with sys.exit, which runs atexit).
SEGFLOW = """
import atexit, re, sys
def peak():
    hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
    sys.stderr.write(f"\\nVmHWM {hwm}\\n")
atexit.register(peak)
from segflow.cli import app
sys.argv[0] = "segflow"
app()
"""

# DuckDB over the run's files (argv[1]): a view of each table of argv[3], then each statement
# of argv[2] (JSON lists); prints the rows of each as JSON, then its VmHWM.
DUCKDB = """
import json, re, sys
import duckdb
db = duckdb.connect()
db.execute("SET enable_progress_bar = false")
for name in json.loads(sys.argv[3]):
    files = f"{sys.argv[1]}/{name}/*.parquet"
    db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{files}')")
answers = []
for sql in json.loads(sys.argv[2]):
    answers.append([list(row) for row in db.sql(sql).fetchall()])
print(json.dumps(answers, default=str))
hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
print("VmHWM", hwm)
"""

# mIoU from summed counts, as segflow.metrics.semantic: the mean over classes with a union.
MIOU = """
WITH sums AS (
    SELECT class_id, sum(intersection) AS i, sum(gt_pixels) + sum(pred_pixels) AS gp
    FROM class_stats WHERE image_id IN (
        SELECT image_id FROM images WHERE ({where}) AND status = 'ok' AND gt_uri IS NOT NULL
    ) GROUP BY class_id
)
SELECT avg(i / (gp - i)) FROM sums WHERE gp - i > 0
"""
CONFUSION = "SELECT gt_class, pred_class, sum(pixels) FROM confusion GROUP BY ALL"
WORST = (
    "SELECT image_id, uri FROM images WHERE status = 'ok' AND miou IS NOT NULL "
    "ORDER BY miou, uri LIMIT 12"
)


def seed_tables(work: Path) -> dict[str, pa.Table]:
    """Every table of a run of the first SEED_FRAMES CamVid frames, segmented and evaluated
    in this process (once: kept under ``work``)."""
    from segflow import schema

    folder = work / f"seed-{SEED_FRAMES}"
    if not (folder / "done").exists():
        from segflow.groundtruth import open_ground_truth
        from segflow.models import load_model
        from segflow.shard import segment_images

        model = load_model(MODEL, device="cpu")
        frames = sorted(FRAMES.glob("*.png"))[:SEED_FRAMES]
        result = segment_images(
            model,
            [str(frame) for frame in frames],
            run_id=RUN_ID,
            ground_truth=open_ground_truth(GT, ignore_index=IGNORE_INDEX),
        )
        if result.num_failed or result.num_not_evaluated:
            raise RuntimeError(f"segmenting the seed frames failed: {result.tables['errors']}")
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in result.tables.items():
            schema.write_table(name, table, str(folder / f"{name}.parquet"))
        (folder / "done").touch()
    return {
        name: schema.read_table(name, str(folder / f"{name}.parquet")) for name in schema.TABLES
    }


def semantic_run(work: Path, images: int) -> Path:
    """The folder of a finished semantic run of ``images`` images made of the seed's rows
    (see the module's docstring), made once under ``work``."""
    import numpy as np

    from segflow import schema
    from segflow.manifest import build_manifest, shards
    from segflow.models import load_model
    from segflow.preflight import evaluation_info, run_config
    from segflow.store import RunStore

    out = work / f"semantic-{images}"
    store = RunStore(str(out), RUN_ID)
    if store.read_json("summary.json") is not None:
        return Path(store.root)
    seed = seed_tables(work)
    frames = [Path(uri).name for uri in seed["images"].column("uri").to_pylist()]
    copies = work / "frames"
    uris = [
        str(copies / f"copy-{k // len(frames):06d}" / frames[k % len(frames)])
        for k in range(images)
    ]
    for copy in range(-(-images // len(frames))):
        folder = copies / f"copy-{copy:06d}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for frame in frames:
                (folder / frame).symlink_to(FRAMES / frame)
    started = time.perf_counter()
    config = run_config(str(copies), str(MODEL), SHARD_SIZE, {}, GT, IGNORE_INDEX, None)
    store.prepare(config)
    with tempfile.TemporaryDirectory() as tmp:
        listed, manifest = os.path.join(tmp, "uris.txt"), os.path.join(tmp, "manifest.parquet")
        Path(listed).write_text("\n".join(uris) + "\n")
        build_manifest(listed, manifest)
        store.put_manifest(manifest)
    model = load_model(MODEL, device="cpu")
    store.write_json("evaluation.json", evaluation_info(model, GT, IGNORE_INDEX))
    # Each seed table's row numbers by the seed image they belong to.
    seed_ids = seed["images"].column("image_id").to_pylist()
    rows_of = {}
    for name, table in seed.items():
        ids = table.column("image_id").to_numpy()
        rows_of[name] = [np.flatnonzero(ids == image_id) for image_id in seed_ids]
    masks = 0
    all_shards = list(shards(images, SHARD_SIZE))
    for shard in all_shards:
        positions = [k % len(frames) for k in range(shard.start, shard.stop)]
        shard_uris = uris[shard.start : shard.stop]
        shard_ids = [schema.image_id_for(uri) for uri in shard_uris]
        tables = {}
        for name, table in seed.items():
            picked = [rows_of[name][p] for p in positions]
            repeats = [len(rows) for rows in picked]
            taken = table.take(pa.array(np.concatenate(picked), pa.int64()))
            for column, values in (("image_id", shard_ids), ("uri", shard_uris)):
                if column in table.column_names:
                    repeated = pa.array(
                        np.repeat(np.array(values), repeats), table.schema.field(column).type
                    )
                    taken = taken.set_column(
                        taken.column_names.index(column), table.schema.field(column), repeated
                    )
            tables[name] = taken
        masks += tables["masks"].num_rows
        summary = {
            "shard": shard.index,
            "images": len(shard),
            "failed": 0,
            "not_evaluated": 0,
            "masks": tables["masks"].num_rows,
        }
        store.commit_shard(shard, tables, summary)
    seconds = time.perf_counter() - started
    store.finish(
        {
            "images": images,
            "failed": 0,
            "not_evaluated": 0,
            "masks": masks,
            "shards": len(all_shards),
            "seconds": seconds,
            "images_per_second": images / seconds,
        }
    )
    print(f"  made a run of {images:,} images ({masks:,} masks) in {seconds:.0f} s", flush=True)
    return Path(store.root)


@dataclass(frozen=True)
class Measured:
    seconds: float
    rss_mib: float
    answer: Any


def measure(argv: list[str]) -> tuple[float, float, str, str]:
    """Seconds, peak RSS (MiB), stdout and stderr of ``argv`` run in a fresh process from
    this checkout; its last line on stderr or stdout is ``VmHWM <KiB>``."""
    started = time.perf_counter()
    output = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "SEGFLOW_SHARED": str(SHARED)},
    )
    seconds = time.perf_counter() - started
    if output.returncode:
        raise RuntimeError(f"{argv[3:]} failed ({output.returncode}):\n{output.stderr}")
    lines = (output.stderr + output.stdout).split("\n")
    [hwm_kib] = [line.split()[1] for line in lines if line.startswith("VmHWM ")]
    return seconds, int(hwm_kib) / 1024, output.stdout, output.stderr


def segflow(*args: str) -> tuple[float, float, str]:
    """Seconds, peak RSS (MiB) and what it printed but DuckDB's progress bar (lines holding
    its "▕"), which goes to stdout too once a query has run for 2 s, ahead of the JSON of
    ``--json`` and ``--format json``."""
    seconds, rss, stdout, _ = measure([sys.executable, "-c", SEGFLOW, *args])
    lines = stdout.split("\n")
    return seconds, rss, "\n".join(line for line in lines if "\u2595" not in line)


def duckdb_direct(run: Path, *statements: str) -> Measured:
    """DuckDB over the run's files, each statement formatted with the answers before it."""
    tables = ["masks", "images", "errors", "class_stats", "confusion"]
    argv = [sys.executable, "-c", DUCKDB, str(run), json.dumps(statements), json.dumps(tables)]
    seconds, rss, stdout, _ = measure(argv)
    return Measured(seconds, rss, json.loads(stdout.splitlines()[0]))


def same(a: Any, b: Any) -> bool:
    """Equal, floats to 9 significant digits (JSON and DuckDB print them differently)."""
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compared(run: Path, images: int) -> list[tuple[str, Measured, Measured, bool | None]]:
    """Each command beside DuckDB direct: (label, segflow, DuckDB, same answer), after the
    cost of starting either (no answer to compare)."""
    # What every command pays before it reads anything: the interpreter and its imports.
    seconds, rss, _ = segflow("--help")
    rows = [
        (
            "startup: --help / SELECT 1",
            Measured(seconds, rss, None),
            duckdb_direct(run, "SELECT 1"),
            None,
        )
    ]
    queries = (
        ("query count, sum(area)", "SELECT count(*), sum(area) FROM masks"),
        ("query area by class", "SELECT class_name, sum(area) FROM masks GROUP BY 1 ORDER BY 1"),
        (
            "query 10 worst images",
            "SELECT image_id, miou FROM images ORDER BY miou, image_id LIMIT 10",
        ),
    )
    for label, sql in queries:
        seconds, rss, stdout = segflow("query", str(run), sql, "--format", "json")
        answer = [list(row.values()) for row in json.loads(stdout)]
        direct = duckdb_direct(run, sql)
        rows.append((label, Measured(seconds, rss, answer), direct, same(answer, direct.answer[0])))
    for label, where in (("evaluate", None), ("evaluate --where (10 %)", "image_id % 10 = 0")):
        slice_ = ["--where", where] if where else []
        seconds, rss, stdout = segflow("evaluate", str(run), *slice_, "--json")
        miou = json.loads(stdout)["semantic"]["miou"]
        direct = duckdb_direct(run, MIOU.format(where=where or "true"), CONFUSION)
        rows.append(
            (label, Measured(seconds, rss, miou), direct, same(miou, direct.answer[0][0][0]))
        )
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        seconds, rss, _ = segflow("report", str(run), "--out", str(page))
        html_page = page.read_text()
        direct = duckdb_direct(
            run,
            MIOU.format(where="true"),
            CONFUSION,
            WORST,
            "SELECT count(*) FROM errors",
            f"SELECT * FROM masks WHERE image_id IN (SELECT image_id FROM ({WORST}))",
        )
        worst = [uri for _, uri in direct.answer[2]]
        drawn = "cannot be drawn" not in html_page and all(
            html.escape(uri) in html_page for uri in worst
        )
        rows.append(("report", Measured(seconds, rss, None), direct, drawn))
        from segflow.store import RunStore

        files = RunStore(str(run.parent), RUN_ID).files("images")
        image_id = pq.read_table(files[len(files) // 2], columns=["image_id"])[0][0].as_py()
        png = Path(tmp) / "show.png"
        seconds, rss, _ = segflow("show", str(run), str(image_id), "--out", str(png))
        with Image.open(png) as picture:
            size = list(picture.size)
        direct = duckdb_direct(
            run,
            f"SELECT uri FROM images WHERE image_id = {image_id}",
            f"SELECT width, height, class_id, counts FROM masks WHERE image_id = {image_id}",
        )
        rows.append(
            ("show", Measured(seconds, rss, size), direct, same(size, direct.answer[1][0][:2]))
        )
    return rows


def queries(work: Path, sizes: Sequence[int]) -> None:
    print("queries: a semantic run on local disk; segflow's commands beside DuckDB direct")
    header = (
        f"  {'command':<26} {'segflow s':>9} {'MiB':>6}   {'DuckDB s':>8} {'MiB':>6}"
        f"   {'ratio':>5}  same  goals"
    )
    by_size = {}
    for images in sizes:
        run = semantic_run(work, images)
        size = sum(file.stat().st_size for file in run.rglob("*.parquet"))
        print(
            f"\n  {images:,} images in shards of {SHARD_SIZE}, {size / 2**20:,.0f} MiB of Parquet:"
            f" {run}",
            flush=True,
        )
        print(header)
        by_size[images] = {}
        for label, ours, direct, agreed in compared(run, images):
            by_size[images][label] = ours
            ratio = ours.seconds / direct.seconds
            goals = [ratio <= RATIO_GOAL, ours.rss_mib <= RSS_GOAL_MIB]
            if label == "report":
                goals.append(ours.seconds <= REPORT_GOAL_S)
            mark = {None: "  ", True: "==", False: "!="}[agreed]
            met = "" if agreed is None else "ok" if all(goals) else "MISS"
            print(
                f"  {label:<26} {ours.seconds:9.2f} {ours.rss_mib:6.0f}   "
                f"{direct.seconds:8.2f} {direct.rss_mib:6.0f}   {ratio:5.2f}  {mark}    {met}",
                flush=True,
            )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print(f"\n  growth of peak RSS from {small:,} to {large:,} images (goal: at most 1.2x)")
        for label, ours in by_size[large].items():
            growth = ours.rss_mib / by_size[small][label].rss_mib
            print(f"  {label:<26} {growth:5.2f}x  {'ok' if growth <= 1.2 else 'MISS'}")
    print("\n  not measured: after compact, export-coco (no instance run synthesised), S3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["planning", "queries"], help="one part (default both)")
    parser.add_argument("--work", type=Path, help="where the inputs are made (kept)")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare")
    parser.add_argument(
        "--images", type=int, nargs="+", default=QUERY_SIZES, help="queries: run sizes"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "segflow-bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; inputs under {work}")
    if args.only in (None, "planning"):
        with tempfile.TemporaryDirectory() as folder:
            baseline = Path(folder) / "baseline"
            git = ["git", "-C", str(REPO_ROOT), "worktree"]
            subprocess.run([*git, "add", "--detach", str(baseline), args.baseline], check=True)
            try:
                planning(work, baseline)
            finally:
                subprocess.run([*git, "remove", "--force", str(baseline)], check=True)
    if args.only in (None, "queries"):
        sys.path.insert(0, str(REPO_ROOT))  # the run is made with this checkout's segflow
        queries(work, args.images)


if __name__ == "__main__":
    main()
