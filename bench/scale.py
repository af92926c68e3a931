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
files directly (``read_parquet([...])`` of each table's Delta file list, deltalake's
``DeltaTable(uri).file_uris()``, in a fresh ``python -c``: not a glob, which would also read
a killed attempt's files and those a compaction replaced) and computing the same answer,
which is checked (``!=`` in the table where they differ):

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
``export-coco`` (an instance run)  the same COCO results written by ``COPY ... TO`` JSON; the
                                   two files' counts and digests (DuckDB's ``hash`` of each
                                   result's values, summed) must be equal
=================================  ========================================================

Then the same after ``segflow compact`` (on a copy of each run, with the default retention,
so the files it replaced stay on disk in no table; its time and peak RSS printed), then
``export-coco`` on an instance run of the smallest size, then, with ``--s3-images N``, the
queries and ``evaluate`` on a semantic run of N copied to a moto server on 127.0.0.1 (DuckDB
direct reading it through s3fs, as segflow does: DuckDB's httpfs is not installed here).

The run is synthesised, not segmented: the CamVid validation frames (:data:`SEED_FRAMES`,
all 101 of them) are segmented once, in process, with the exported ESPNet and their label
maps as ground truth (``segflow.shard.segment_images``, so every table holds real rows: RLE
strings, class_stats, confusion cells, per-image figures), and those rows are repeated under
new URIs, copy ``c`` of frame ``F`` being ``frames/copy-<c>/F`` (a symbolic link to the
frame, so that ``report`` and ``show`` read and draw real images, and the label maps, found
by file name, still apply), and new image ids (:func:`segflow.schema.image_id_for` of the
URI). Shards of 256 are written as an actor writes them
(:meth:`segflow.store.RunStore.write_shard`) after ``run.json``, ``evaluation.json`` and the
manifest, committed :data:`COMMIT_BATCH` shards a Delta transaction, and the run is finished
with its ``summary.json``; it is made once under ``--work`` and reused. The instance run is
the COCO subset's 10 images, with the tests' jittered ground truth as detections, repeated
likewise.
The worst images are then copies of the worst frame (ties go by URI). A frame's strings
repeat about 2.5 times a shard, so Parquet's dictionaries make the files smaller than a
real run's.

Goals at 1 M images: each command within 2x DuckDB direct's time and 1 GB of peak RSS, and
flat from 100 k to 1 M (at most 1.2x growth, printed when two sizes are measured); ``report``
within 30 s. The table marks each goal met (``ok``) or not (``MISS``) at every size measured.
segflow's commands read the run through :meth:`segflow.evaluation.Run.connect`: DuckDB's
``read_parquet`` over the committed files, natively on a local disk (their SQL is SELECT
statements alone; see :mod:`segflow.sql`), through a read-only file system in Python on S3,
so on a local run the ratio is mostly the interpreter's start and imports (typer and
pydantic, numpy, pyarrow, fsspec). The machine's load average is printed beside each table:
compare ratios measured side by side, not seconds across runs.

Usage: .venv/bin/python bench/scale.py [--only planning|queries] [--work DIR]
       [--baseline REV] [--images N [N ...]] [--s3-images N]
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
COCO = SHARED / "data" / "coco_val2017_10"
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

# DuckDB over the run's committed files: argv[1] is the run (a folder or an s3:// URI), each
# table's files the Delta log's (deltalake's file_uris(), what any engine given a table's
# file list reads; a glob would also read a killed attempt's files, and after a compaction
# the files it replaced); a view of each table of argv[3], then each statement of argv[2]
# (JSON lists); prints the rows of each as JSON, then its VmHWM. On S3 (no httpfs here)
# DuckDB reads through s3fs, as segflow does.
DUCKDB = """
import json, os, re, sys
import duckdb
from deltalake import DeltaTable
run = sys.argv[1]
options = {"AWS_ALLOW_HTTP": "true"} if run.startswith("s3://") else None
db = duckdb.connect()
db.execute("SET enable_progress_bar = false")
if run.startswith("s3://"):
    import fsspec
    db.register_filesystem(fsspec.filesystem("s3"))
for name in json.loads(sys.argv[3]):
    files = DeltaTable(f"{run}/{name}", storage_options=options).file_uris()
    source = f"read_parquet({files!r})" if files else f"(SELECT NULL AS image_id LIMIT 0)"
    db.execute(f"CREATE VIEW {name} AS SELECT * FROM {source}")
answers = []
for sql in json.loads(sys.argv[2]):
    answers.append([list(row) for row in db.execute(sql).fetchall()])
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
    """The folder of a finished semantic run of ``images`` images made of the CamVid seed's
    rows (see the module's docstring), made once under ``work``."""
    from segflow.job import Job
    from segflow.models import load_model
    from segflow.preflight import evaluation_info, run_config

    out = work / f"semantic-{images}"
    if (out / f"run={RUN_ID}" / "summary.json").exists():
        return out / f"run={RUN_ID}"
    seed = seed_tables(work)
    copies = work / "frames"
    job = Job(
        input=str(copies),
        model=str(MODEL),
        out=str(out),
        gt=GT,
        ignore_index=IGNORE_INDEX,
        shard_size=SHARD_SIZE,
    )
    evaluation = evaluation_info(load_model(MODEL, device="cpu"), GT, IGNORE_INDEX)
    return repeated_run(out, images, seed, copies, run_config(job), evaluation, link=FRAMES)


def instance_seed(work: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Every table of an instance run of the COCO subset's images (:data:`COCO`), its
    detections the tests' jittered ground truth (``tests/conftest.py``), scored by the
    workers' code path; and its ``evaluation.json``. Made once under ``work``."""
    from segflow import schema

    folder = work / "seed-coco"
    if not (folder / "done").exists():
        import contextlib
        import io

        import numpy as np
        from pycocotools.coco import COCO as CocoApi

        from segflow.groundtruth import open_ground_truth
        from segflow.scoring import scorer_for
        from segflow.shard import mask_rows
        from tests.conftest import image_row, jittered_detections

        gt_path = COCO / "annotations" / "instances_val2017_subset.json"
        with contextlib.redirect_stdout(io.StringIO()):
            coco = CocoApi(str(gt_path))
        names = ["N/A"] * (max(coco.cats) + 1)
        for category_id, category in coco.cats.items():
            names[category_id] = category["name"]
        ground_truth = open_ground_truth(f"coco:{gt_path}")
        scorer = scorer_for(ground_truth, tuple(names), "instance")
        model = type("Jitter", (), {"name": "jitter", "classes": tuple(names), "task": "instance"})
        rng = np.random.default_rng(3)
        masks, images = [], []
        for coco_id in sorted(coco.imgs):
            uri = str(COCO / "images" / coco.imgs[coco_id]["file_name"])
            target = ground_truth.target(uri)
            prediction = jittered_detections(coco, coco_id, rng)
            rows = mask_rows(prediction, model, run_id="inst", uri=uri)
            figures = scorer.score(schema.image_id_for(uri), uri, prediction, rows, target)
            masks += rows
            images.append(image_row(uri, prediction, len(rows), figures))
        tables = {
            "masks": schema.table_from_rows("masks", masks),
            "images": schema.table_from_rows("images", images),
            "errors": schema.table_from_rows("errors", []),
        } | scorer.tables("inst")
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            schema.write_table(name, table, str(folder / f"{name}.parquet"))
        evaluation = {
            "task": "instance",
            "classes": names,
            "gt": f"coco:{gt_path}",
            "ignore_index": None,
            "categories": {str(k): v["name"] for k, v in coco.cats.items()},
        }
        (folder / "evaluation.json").write_text(json.dumps(evaluation))
        (folder / "done").touch()
    tables = {
        name: schema.read_table(name, str(folder / f"{name}.parquet")) for name in schema.TABLES
    }
    return tables, json.loads((folder / "evaluation.json").read_text())


def instance_run(work: Path, images: int) -> Path:
    """The folder of a finished instance run of ``images`` images: the COCO seed's rows
    repeated under new URIs (their ground truth still the seed image's), made once."""
    out = work / f"instance-{images}"
    if (out / f"run={RUN_ID}" / "summary.json").exists():
        return out / f"run={RUN_ID}"
    seed, evaluation = instance_seed(work)
    config = {"input": "coco-copies", "model": "jitter", "shard_size": SHARD_SIZE}
    return repeated_run(out, images, seed, work / "coco-copies", config, evaluation, link=None)


# Shards a Delta transaction when the synthesiser commits: the segment flow's driver commits
# one shard a transaction (with its application id); batching them makes a 1 M-image run in
# minutes, and a reader of either reads the log from its last checkpoint (every 100 commits).
COMMIT_BATCH = 64


def repeated_run(
    out: Path,
    images: int,
    seed: dict[str, pa.Table],
    copies: Path,
    config: dict[str, Any],
    evaluation: dict[str, Any],
    link: Path | None,
) -> Path:
    """A finished run of ``images`` images under ``out``: the seed's rows repeated under the
    URIs ``copies/copy-<c>/<seed file name>`` (symbolic links to the seed's files in
    ``link``, when given) and their image ids, in shards of :data:`SHARD_SIZE` written as an
    actor writes them (:meth:`~segflow.store.RunStore.write_shard`) and committed in batches
    of :data:`COMMIT_BATCH` shards, one application id per shard."""
    import numpy as np
    from deltalake import CommitProperties, DeltaTable, Transaction

    from segflow import schema
    from segflow.manifest import build_manifest, shards
    from segflow.store import SHARDS, SHARDS_TABLE, RunStore

    store = RunStore(str(out), RUN_ID)
    frames = [Path(uri).name for uri in seed["images"].column("uri").to_pylist()]
    uris = [
        str(copies / f"copy-{k // len(frames):06d}" / frames[k % len(frames)])
        for k in range(images)
    ]
    for copy in range(-(-images // len(frames))) if link else ():
        folder = copies / f"copy-{copy:06d}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for frame in frames:
                (folder / frame).symlink_to(link / frame)
    started = time.perf_counter()
    store.prepare(config)
    with tempfile.TemporaryDirectory() as tmp:
        listed, manifest = os.path.join(tmp, "uris.txt"), os.path.join(tmp, "manifest.parquet")
        Path(listed).write_text("\n".join(uris) + "\n")
        build_manifest(listed, manifest)
        store.put_manifest(manifest)
    store.write_json("evaluation.json", evaluation)
    # Each seed table's row numbers by the seed image they belong to.
    seed_ids = seed["images"].column("image_id").to_pylist()
    rows_of = {}
    for name, table in seed.items():
        ids = table.column("image_id").to_numpy()
        rows_of[name] = [np.flatnonzero(ids == image_id) for image_id in seed_ids]

    def commit(batch: list) -> None:
        apps = [Transaction(f"segflow:{RUN_ID}:shard-{w.shard:06d}", 0) for w in batch]
        for name in [*schema.TABLES, SHARDS_TABLE]:
            DeltaTable(store.table_uri(name)).create_write_transaction(
                [f.add_action() for w in batch for f in w.files if f.table == name],
                mode="append",
                schema=SHARDS if name == SHARDS_TABLE else schema.TABLES[name],
                commit_properties=CommitProperties(app_transactions=apps),
            )

    masks, written = 0, []
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
        written.append(store.write_shard(shard, tables, summary))
        if len(written) == COMMIT_BATCH or shard is all_shards[-1]:
            commit(written)
            written = []
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


def duckdb_direct(run: str, *statements: str) -> Measured:
    """DuckDB over the run's committed files, each statement's rows its answer."""
    tables = ["masks", "images", "errors", "class_stats", "confusion"]
    argv = [sys.executable, "-c", DUCKDB, run, json.dumps(statements), json.dumps(tables)]
    seconds, rss, stdout, _ = measure(argv)
    return Measured(seconds, rss, json.loads(stdout.splitlines()[0]))


def same(a: Any, b: Any) -> bool:
    """Equal, floats to 9 significant digits (JSON and DuckDB print them differently)."""
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


Row = tuple[str, Measured, Measured, bool | None]


def compared(run: str, local: bool = True) -> list[Row]:
    """Each command beside DuckDB direct: (label, segflow, DuckDB, same answer), after the
    cost of starting either (no answer to compare); ``report`` and ``show`` when ``local``."""
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
        seconds, rss, stdout = segflow("query", run, sql, "--format", "json")
        answer = [list(row.values()) for row in json.loads(stdout)]
        direct = duckdb_direct(run, sql)
        rows.append((label, Measured(seconds, rss, answer), direct, same(answer, direct.answer[0])))
    for label, where in (("evaluate", None), ("evaluate --where (10 %)", "image_id % 10 = 0")):
        slice_ = ["--where", where] if where else []
        seconds, rss, stdout = segflow("evaluate", run, *slice_, "--json")
        miou = json.loads(stdout)["semantic"]["miou"]
        direct = duckdb_direct(run, MIOU.format(where=where or "true"), CONFUSION)
        rows.append(
            (label, Measured(seconds, rss, miou), direct, same(miou, direct.answer[0][0][0]))
        )
    if not local:
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        seconds, rss, _ = segflow("report", run, "--out", str(page))
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

        files = RunStore(str(Path(run).parent), RUN_ID).files("images")
        image_id = pq.read_table(files[len(files) // 2], columns=["image_id"])[0][0].as_py()
        png = Path(tmp) / "show.png"
        seconds, rss, _ = segflow("show", run, str(image_id), "--out", str(png))
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


# An instance run's detections as COCO results, as `segflow export-coco` writes them: the
# ground truth's image ids (in images.gt_uri) and category ids (by class name: {categories},
# VALUES rows), scores as doubles (JSON's numbers).
COCO_RESULTS = """
COPY (
    SELECT regexp_extract(i.gt_uri, '#image_id=(\\d+)$', 1)::BIGINT AS image_id,
        c.id AS category_id, m.score::DOUBLE AS score, m.bbox,
        {{'size': [m.height, m.width], 'counts': m.counts}} AS segmentation
    FROM masks m JOIN images i USING (image_id)
    JOIN (VALUES {categories}) c(id, name) ON c.name = m.class_name
    WHERE i.gt_uri IS NOT NULL
) TO '{out}' (FORMAT json, ARRAY true)
"""
# What two results files agree on: their count, and a digest of their results as values
# (read back by DuckDB, so that neither writer's number formatting counts), in any order.
COCO_DIGEST = (
    "SELECT count(*), sum(hash(image_id, category_id, score, bbox, segmentation.size, "
    "segmentation.counts)::HUGEINT)::VARCHAR FROM read_json('{path}', format = 'array')"
)


def exported(run: str) -> list[Row]:
    """``export-coco`` beside DuckDB direct writing the same results."""
    import duckdb

    evaluation = json.loads((Path(run) / "evaluation.json").read_text())
    categories = ", ".join(f"({int(k)}, '{name}')" for k, name in evaluation["categories"].items())
    with tempfile.TemporaryDirectory() as tmp:
        ours_file, direct_file = f"{tmp}/segflow.json", f"{tmp}/duckdb.json"
        seconds, rss, _ = segflow("export-coco", run, ours_file)
        direct = duckdb_direct(run, COCO_RESULTS.format(categories=categories, out=direct_file))
        with duckdb.connect() as db:
            digests = [
                db.sql(COCO_DIGEST.format(path=f)).fetchall() for f in (ours_file, direct_file)
            ]
    count = digests[0][0][0]
    return [
        (
            f"export-coco ({count:,} results)",
            Measured(seconds, rss, None),
            direct,
            digests[0] == digests[1],
        )
    ]


def compacted_run(work: Path, images: int) -> tuple[Path, Measured]:
    """A copy of the semantic run of ``images`` images compacted by ``segflow compact`` (its
    default retention: the files it replaced stay on disk, in no table), and the compaction's
    time and peak RSS; made once."""
    import shutil

    run = semantic_run(work, images)
    out = work / f"semantic-{images}-compacted"
    done = out / "compacted.json"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(run.parent, out, symlinks=True)
        seconds, rss, _ = segflow("compact", str(out / run.name))
        done.write_text(json.dumps([seconds, rss]))
    seconds, rss = json.loads(done.read_text())
    return out / run.name, Measured(seconds, rss, None)


def s3_run(work: Path, images: int, bucket: str) -> str:
    """The semantic run of ``images`` images copied to ``s3://bucket`` (the moto server the
    environment points at)."""
    import fsspec

    run = semantic_run(work, images)
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    target = f"{bucket}/semantic-{images}"
    fs.put(str(run.parent) + "/", target, recursive=True)
    return f"s3://{target}/{run.name}"


def committed_mib(run: str) -> float:
    from segflow.evaluation import open_run

    store = open_run(run).store
    files = [
        f for name in ("masks", "images", "class_stats", "confusion") for f in store.files(name)
    ]
    return sum(store.fs.size(f) for f in files) / 2**20


def queries(work: Path, sizes: Sequence[int], s3_images: int | None) -> None:
    print("queries: segflow's commands beside DuckDB direct over the tables' committed files")
    print(f"  load average at start: {os.getloadavg()[0]:.2f} (2 cores shared)")
    header = (
        f"  {'command':<30} {'segflow s':>9} {'MiB':>6}   {'DuckDB s':>8} {'MiB':>6}"
        f"   {'ratio':>5}  same  goals"
    )

    def table(title: str, rows: list[Row]) -> dict[str, Measured]:
        print(f"\n  {title} (load {os.getloadavg()[0]:.2f})", flush=True)
        print(header)
        found = {}
        for label, ours, direct, agreed in rows:
            found[label] = ours
            ratio = ours.seconds / direct.seconds
            goals = [ratio <= RATIO_GOAL, ours.rss_mib <= RSS_GOAL_MIB]
            if label == "report":
                goals.append(ours.seconds <= REPORT_GOAL_S)
            mark = {None: "  ", True: "==", False: "!="}[agreed]
            met = "" if agreed is None else "ok" if all(goals) else "MISS"
            print(
                f"  {label:<30} {ours.seconds:9.2f} {ours.rss_mib:6.0f}   "
                f"{direct.seconds:8.2f} {direct.rss_mib:6.0f}   {ratio:5.2f}  {mark}    {met}",
                flush=True,
            )
        return found

    def growth(title: str, by_size: dict[int, dict[str, Measured]]) -> None:
        if len(by_size) < 2:
            return
        small, large = min(by_size), max(by_size)
        print(f"\n  {title}: growth of peak RSS from {small:,} to {large:,} (goal: at most 1.2x)")
        for label, ours in by_size[large].items():
            grew = ours.rss_mib / by_size[small][label].rss_mib
            print(f"  {label:<30} {grew:5.2f}x  {'ok' if grew <= 1.2 else 'MISS'}")

    before, after = {}, {}
    for images in sizes:
        run = str(semantic_run(work, images))
        title = f"{images:,} images, shards of {SHARD_SIZE}, {committed_mib(run):,.0f} MiB: {run}"
        before[images] = table(title, compared(run))
    growth("before compact", before)
    for images in sizes:
        run, compaction = compacted_run(work, images)
        written = (run.parent / "compacted.json").stat().st_mtime
        made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(written))
        print(
            f"\n  segflow compact, {images:,} images: {compaction.seconds:.1f} s, "
            f"{compaction.rss_mib:.0f} MiB peak RSS (when the copy was made, {made})"
        )
        after[images] = table(f"after compact, {images:,} images: {run}", compared(str(run)))
    growth("after compact", after)
    run = str(instance_run(work, min(sizes)))
    table(f"instance run, {min(sizes):,} images (COCO subset repeated): {run}", exported(run))
    if s3_images:
        from segflow.demo.s3 import local_s3

        with local_s3() as env:
            os.environ.update(env)
            try:
                run = s3_run(work, s3_images, "segflow-bench")
                table(
                    f"{s3_images:,} images on moto S3 (127.0.0.1): {run}",
                    compared(run, local=False),
                )
            finally:
                for name in env:
                    del os.environ[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["planning", "queries"], help="one part (default both)")
    parser.add_argument("--work", type=Path, help="where the inputs are made (kept)")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare")
    parser.add_argument(
        "--images", type=int, nargs="+", default=QUERY_SIZES, help="queries: run sizes"
    )
    parser.add_argument(
        "--s3-images", type=int, default=None, help="queries: also a run of N on moto S3"
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
        queries(work, args.images, args.s3_images)


if __name__ == "__main__":
    main()
