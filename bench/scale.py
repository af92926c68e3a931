"""segflow at the scale of millions of images, measured (a benchmark, not a timed test).

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

Usage: .venv/bin/python bench/scale.py --only planning [--work DIR] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["planning"], default="planning")
    parser.add_argument("--work", type=Path, help="where the inputs are made (kept)")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare")
    args = parser.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "segflow-bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; inputs under {work}")
    with tempfile.TemporaryDirectory() as folder:
        baseline = Path(folder) / "baseline"
        git = ["git", "-C", str(REPO_ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(baseline), args.baseline], check=True)
        try:
            planning(work, baseline)
        finally:
            subprocess.run([*git, "remove", "--force", str(baseline)], check=True)


if __name__ == "__main__":
    main()
