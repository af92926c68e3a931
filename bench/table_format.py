"""Delta Lake beside Apache Iceberg as segflow's run table format, measured (a benchmark, not a
timed test).

One ``masks`` table (:data:`segflow.schema.TABLES`) on local disk, in each format, gets N shards
(``--shards``, default 600) committed one transaction a shard, the driver's way, from
Parquet files written beforehand (untimed; a few rows a shard: 4 images of a synthetic
120 x 160 label map of 3 classes, encoded by :mod:`segflow.rle`, under new URIs and image ids):

* Delta (deltalake): segflow's own commit, :meth:`segflow.store.RunStore._commit_file` on a
  run :meth:`~segflow.store.RunStore.prepare` made: open the table, ``transaction_version``
  of the application transaction ``segflow:<run>:shard-NNNNNN`` (the idempotency check), then
  ``create_write_transaction`` of the file's add action and that transaction; a checkpoint
  every 100 commits (:data:`segflow.store.TABLE_CONFIGURATION`), written within the commit.
* Iceberg (pyiceberg): a SQL catalog (a sqlite file beside the table), ``load_table``, then
  the idempotency check, then ``add_files([path])`` (the file as it is, no rewrite) with the
  snapshot summary property :data:`APP_KEY` naming the shard. The check walks the current
  snapshot's ancestors (parent ids, through a dict of the loaded metadata's snapshots:
  pyiceberg's own ``ancestors_of`` looks each parent up in a list) for a summary naming the
  shard: linear in the commits so far, on top of ``load_table``'s parse of a metadata JSON
  that holds every snapshot and its summary. ``add_files``'s own duplicate check (on by
  default) compares paths, which a retried attempt's new file name escapes, and reads every
  manifest of the table; it is off here, and its cost after the N commits is printed on its
  own (:data:`DEFAULT_CHECK_COMMITS` more commits with it on).

An Iceberg commit's cost grows with the snapshots the table keeps, about 1.3 ms each here
(profiled: mostly pyiceberg's deep copies of the whole table metadata, every snapshot, within
the transaction), so 600 shards take about 7 minutes on this 2-core machine and 2,000 would
take most of an hour.

The formats alternate in blocks of :data:`BLOCK` commits (Delta, Iceberg, Delta, ...); the
commit times, median and p90, are printed for each format's first and last :data:`BLOCK`
commits (both formats' costs grow with history), with the Iceberg check's share. Then:

* listing the committed files, what every reader does first, in a fresh process for each
  (3 rounds, alternating): Delta ``DeltaTable(p).file_uris()`` replaying the JSON log alone
  (a copy of the log without its checkpoints) and after ``create_checkpoint()``; Iceberg
  ``catalog.load_table(...).scan().plan_files()`` on its metadata as it stands (one
  manifest a commit: pyiceberg appends without merging manifests by default). Printed, medians:
  the first listing's wall time (as a reader pays it: with the modules and thread pools the
  library sets up on first use), a second one's in the same process, and the first's peak
  RSS growth over the process's RSS after importing the library (``VmHWM`` after minus
  ``VmRSS`` before); each listing is checked to find every committed file;
* a retried commit of shard 0 (a new attempt's file) is a no-op in both: the version or
  snapshot and the row count are unchanged (asserted);
* what each library has for compaction and vacuum (their public API, printed), what Delta's
  ``vacuum(full=True)`` would remove (dry run), and what Iceberg's ``expire_snapshots`` does
  here: the snapshots and files before and after (it deletes no file), and whether the
  idempotency check still finds shard 0 afterwards (the summaries go with the snapshots).

The load average is printed at the start and the end; compare the formats side by side, not
seconds across runs. Run it under ``nice -n 19`` on a shared machine.

pyiceberg is an optional, benchmark-only dependency, not in segflow's constraints; install
it beside the venv, without the packages the venv has (so both formats run on its pyarrow)::

    .venv/bin/pip install --no-deps --target /tmp/iceberg-lib pyiceberg==0.12.0 mmh3 \\
        pyroaring strictyaml tenacity zstandard

(``pip install --target DIR 'pyiceberg[sql-sqlite]'`` also works; then delete from DIR the
packages the venv already has: pyarrow's, fsspec's, pydantic's copies would shadow them.)

Usage: PYTHONPATH=/tmp/iceberg-lib:. nice -n 19 .venv/bin/python bench/table_format.py
       [--shards N] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from segflow import rle, schema
from segflow.manifest import Shard
from segflow.store import RunStore

RUN_ID = "bench"
TABLE = "masks"
IDENTIFIER = ("run", TABLE)
APP_KEY = "segflow.app-id"
BLOCK = 100
IMAGES_A_SHARD = 4
HEIGHT, WIDTH = 120, 160
ROUNDS = 3
DEFAULT_CHECK_COMMITS = 5

# Each child lists one table twice and prints: files, the first listing's seconds, the
# second's, and the first's RSS growth in bytes.
_CHILD = """
import sys, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def files():
    if kind == "iceberg":
        tasks = catalog.load_table(("run", "masks")).scan().plan_files()
        return [task.file.file_path for task in tasks]
    return DeltaTable(where).file_uris()

kind, where = sys.argv[1], sys.argv[2]
if kind == "iceberg":
    from pyiceberg.catalog.sql import SqlCatalog
    catalog = SqlCatalog("bench", uri=f"sqlite:///{where}/catalog.db", warehouse=f"file://{where}")
else:
    from deltalake import DeltaTable
before = status("VmRSS")
started = time.perf_counter()
listed = len(files())
first = time.perf_counter() - started
growth = status("VmHWM") - before
started = time.perf_counter()
files()
print(listed, first, time.perf_counter() - started, growth)
"""


@dataclass(frozen=True)
class Commit:
    seconds: float
    # Iceberg's shares: load_table, then the idempotency check (Delta's are inside the commit)
    load_seconds: float
    check_seconds: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=600)
    parser.add_argument("--work", type=Path, help="a folder for the tables (default: a temp dir)")
    args = parser.parse_args()
    try:
        from pyiceberg.catalog.sql import SqlCatalog
    except ImportError as exc:
        print(
            f"pyiceberg with its SQL catalog is needed ({exc}): pip install --target DIR "
            "'pyiceberg[sql-sqlite]', then run with PYTHONPATH=DIR:. (see this file's doc)",
            file=sys.stderr,
        )
        sys.exit(2)
    import deltalake
    import pyiceberg

    print(f"load at start: {_load()}")
    print(
        f"deltalake {deltalake.__version__}, pyiceberg {pyiceberg.__version__}, "
        f"pyarrow {pa.__version__}; {args.shards} shards, {IMAGES_A_SHARD} images a shard"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        store = RunStore(str(work / "delta"), RUN_ID)
        store.prepare({"bench": "table_format"})
        iceberg_dir = work / "iceberg"
        iceberg_dir.mkdir()
        catalog = SqlCatalog(
            "bench", uri=f"sqlite:///{iceberg_dir}/catalog.db", warehouse=f"file://{iceberg_dir}"
        )
        catalog.create_namespace(IDENTIFIER[0])
        table = catalog.create_table(IDENTIFIER, schema=schema.TABLES[TABLE])
        data_dir = Path(table.location().removeprefix("file://")) / "data"
        data_dir.mkdir(parents=True)

        template = _template_rows()
        delta_files, iceberg_files = [], []
        for index in range(args.shards):
            blob = _shard_file(template, index)
            delta_files.append(store._put_data_file(TABLE, _shard(index), blob, template))
            iceberg_files.append(_put_iceberg_file(data_dir, index, blob))
        print(f"{args.shards} files written a format, {blob.size} bytes each")

        delta: list[Commit] = []
        iceberg: list[Commit] = []
        for start in range(0, args.shards, BLOCK):
            block = range(start, min(start + BLOCK, args.shards))
            delta.extend(_timed_delta(store, index, delta_files[index]) for index in block)
            iceberg.extend(_iceberg_commit(catalog, index, iceberg_files[index]) for index in block)
        _print_commits(delta, iceberg)
        default_check = [
            _iceberg_commit(
                catalog, index, _put_iceberg_file(data_dir, index, blob), check_duplicates=True
            ).seconds
            for index in range(args.shards, args.shards + DEFAULT_CHECK_COMMITS)
        ]
        print(
            f"Iceberg add_files with its default duplicate-path check, after {args.shards} "
            f"commits: median {_ms(statistics.median(default_check))} ms a commit "
            f"({DEFAULT_CHECK_COMMITS} commits)"
        )

        delta_path = store.table_uri(TABLE)
        json_only = work / "delta-json-log"
        (json_only / "_delta_log").mkdir(parents=True)
        for commit in Path(delta_path, "_delta_log").glob("*.json"):
            shutil.copy(commit, json_only / "_delta_log")
        deltalake.DeltaTable(delta_path).create_checkpoint()
        iceberg_shards = args.shards + DEFAULT_CHECK_COMMITS
        _print_listing(
            {
                "Delta, JSON log only": ("delta", str(json_only), args.shards),
                "Delta, after create_checkpoint()": ("delta", delta_path, args.shards),
                "Iceberg, metadata as it stands": ("iceberg", str(iceberg_dir), iceberg_shards),
            }
        )
        _check_retry(store, catalog, data_dir, blob, template)
        _maintenance(store, catalog, iceberg_dir)
    print(f"load at end: {_load()}")


def _template_rows() -> pa.Table:
    """A shard's masks rows: each image the same label map of 3 classes (blocks and a disc)."""
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[HEIGHT // 2 :, :] = 1
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    labels[(rows - 40) ** 2 + (cols - 100) ** 2 < 25**2] = 2
    classes, measured = rle.encode_label_map_measured(labels)
    records = []
    for image in range(IMAGES_A_SHARD):
        uri = f"frames/image-{image:03d}.png"
        for k, class_id in enumerate(classes):
            records.append(
                {
                    "run_id": RUN_ID,
                    "image_id": schema.image_id_for(uri),
                    "uri": uri,
                    "instance": None,
                    "class_id": int(class_id),
                    "class_name": ("road", "building", "tree")[class_id],
                    "score": None,
                    "bbox": [float(v) for v in measured.boxes[k]],
                    "area": int(measured.areas[k]),
                    "counts": measured.rles[k]["counts"].decode(),
                    "height": HEIGHT,
                    "width": WIDTH,
                    "model": "espnet-camvid",
                }
            )
    return schema.table_from_rows(TABLE, records)


def _shard_file(template: pa.Table, index: int) -> pa.Buffer:
    """Shard ``index``'s masks file: the template's rows under this shard's URIs and ids."""
    uris = [
        f"frames/shard-{index:06d}/{uri.rsplit('/', 1)[1]}"
        for uri in template.column("uri").to_pylist()
    ]
    ids = pa.array([schema.image_id_for(uri) for uri in uris], pa.int64())
    rows = template.set_column(1, schema.TABLES[TABLE].field("image_id"), ids)
    rows = rows.set_column(2, schema.TABLES[TABLE].field("uri"), pa.array(uris, pa.string()))
    sink = pa.BufferOutputStream()
    schema.write_table(TABLE, rows, sink)
    return sink.getvalue()


def _shard(index: int) -> Shard:
    return Shard(index, index * IMAGES_A_SHARD, (index + 1) * IMAGES_A_SHARD)


def _put_iceberg_file(data_dir: Path, index: int, blob: pa.Buffer) -> str:
    path = data_dir / f"{_shard(index).name}-{uuid.uuid4().hex[:8]}.parquet"
    path.write_bytes(blob.to_pybytes())
    return f"file://{path}"


def _app_id(index: int) -> str:
    return f"segflow:{RUN_ID}:{_shard(index).name}"


def _timed_delta(store: RunStore, index: int, file: Any) -> Commit:
    started = time.perf_counter()
    store._commit_file(index, file)
    return Commit(time.perf_counter() - started, 0.0, 0.0)


def _iceberg_committed(table: Any, index: int) -> bool:
    """Whether a snapshot of the current one's lineage names shard ``index``'s commit."""
    by_id = {snapshot.snapshot_id: snapshot for snapshot in table.metadata.snapshots}
    snapshot = table.current_snapshot()
    while snapshot is not None:
        if snapshot.summary is not None and snapshot.summary[APP_KEY] == _app_id(index):
            return True
        snapshot = by_id.get(snapshot.parent_snapshot_id)
    return False


def _iceberg_commit(
    catalog: Any, index: int, path: str, *, check_duplicates: bool = False
) -> Commit:
    started = time.perf_counter()
    table = catalog.load_table(IDENTIFIER)
    checked = time.perf_counter()
    done = _iceberg_committed(table, index)
    check_seconds = time.perf_counter() - checked
    if not done:
        table.add_files(
            [path],
            snapshot_properties={APP_KEY: _app_id(index)},
            check_duplicate_files=check_duplicates,
        )
    return Commit(time.perf_counter() - started, checked - started, check_seconds)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _print_commits(delta: list[Commit], iceberg: list[Commit]) -> None:
    print(
        f"\ncommit of one shard, ms (blocks of {BLOCK}, alternating)\n"
        f"{'format':<10} {'commits':<10} {'median':>8} {'p90':>8}   "
        "Iceberg's shares, median: load_table, idempotency check"
    )
    for name, commits in (("Delta", delta), ("Iceberg", iceberg)):
        for label, part in (("first", commits[:BLOCK]), ("last", commits[-BLOCK:])):
            seconds = [commit.seconds for commit in part]
            p90 = statistics.quantiles(seconds, n=10)[-1] if len(seconds) > 1 else seconds[0]
            share = ""
            if name == "Iceberg":
                load = statistics.median(c.load_seconds for c in part)
                check = statistics.median(c.check_seconds for c in part)
                share = f"{_ms(load)}, {_ms(check)}"
            print(
                f"{name:<10} {label + ' ' + str(len(part)):<10} "
                f"{_ms(statistics.median(seconds)):>8} {_ms(p90):>8}   {share}"
            )


def _print_listing(tables: dict[str, tuple[str, str, int]]) -> None:
    """List each table (kind, folder, shards committed) in fresh processes."""
    found: dict[str, list[tuple[float, float, int]]] = {name: [] for name in tables}
    for _ in range(ROUNDS):
        for name, (kind, where, shards) in tables.items():
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, kind, where],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            if int(out[0]) != shards:
                raise SystemExit(f"{name}: listed {out[0]} files, not {shards}")
            found[name].append((float(out[1]), float(out[2]), int(out[3])))
    print(
        f"\nlisting the committed files, a fresh process each, median of {ROUNDS}\n"
        f"{'table':<34} {'files':>6} {'first ms':>9} {'again ms':>9} {'RSS growth MiB':>15}"
    )
    for name, measured in found.items():
        first, again, growth = (statistics.median(m[k] for m in measured) for k in range(3))
        print(
            f"{name:<34} {tables[name][2]:>6} {_ms(first):>9} {_ms(again):>9} "
            f"{growth / 2**20:>15.1f}"
        )


def _check_retry(
    store: RunStore, catalog: Any, data_dir: Path, blob: pa.Buffer, template: pa.Table
) -> None:
    """Commit shard 0 again from a new attempt's file: nothing changes in either format."""
    from deltalake import DeltaTable

    delta = DeltaTable(store.table_uri(TABLE))
    version, rows = delta.version(), delta.count()
    store._commit_file(0, store._put_data_file(TABLE, _shard(0), blob, template))
    delta = DeltaTable(store.table_uri(TABLE))
    assert (delta.version(), delta.count()) == (version, rows), "Delta retry changed the table"

    table = catalog.load_table(IDENTIFIER)
    snapshot = table.current_snapshot()
    _iceberg_commit(catalog, 0, _put_iceberg_file(data_dir, 0, blob))
    after = catalog.load_table(IDENTIFIER).current_snapshot()
    assert after.snapshot_id == snapshot.snapshot_id, "Iceberg retry made a snapshot"
    assert after.summary["total-records"] == snapshot.summary["total-records"]
    print(
        f"\nretried commit of shard 0 (a new attempt's file): a no-op in both (Delta version "
        f"{version}, {rows} rows; Iceberg snapshot unchanged, "
        f"{snapshot.summary['total-records']} rows)"
    )


def _maintenance(store: RunStore, catalog: Any, iceberg_dir: Path) -> None:
    from datetime import UTC, datetime

    from deltalake import DeltaTable
    from pyiceberg.table.maintenance import MaintenanceTable
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    delta = DeltaTable(store.table_uri(TABLE))
    strays = delta.vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True
    )
    print(
        f"\nDelta: optimize.{_public(type(delta.optimize))}, vacuum, cleanup_metadata, "
        f"create_checkpoint; vacuum (dry run) would remove {len(strays)} file(s) no commit "
        "added (the retried attempt's)"
    )
    table = catalog.load_table(IDENTIFIER)
    print(
        f"Iceberg: Table.maintenance.{_public(MaintenanceTable)}, ExpireSnapshots."
        f"{_public(ExpireSnapshots)}; no data-file rewrite (compaction) and no orphan-file "
        "removal in this pyiceberg"
    )
    before = (len(table.metadata.snapshots), _count_files(iceberg_dir))
    table.maintenance.expire_snapshots().older_than(datetime.now(UTC)).commit()
    table = catalog.load_table(IDENTIFIER)
    after = (len(table.metadata.snapshots), _count_files(iceberg_dir))
    print(
        f"Iceberg expire_snapshots().older_than(now): snapshots {before[0]} -> {after[0]}, "
        f"files on disk {before[1]} -> {after[1]}; the idempotency check finds shard 0 "
        f"committed: {_iceberg_committed(table, 0)}"
    )


def _public(cls: type) -> str:
    names = sorted(name for name in vars(cls) if not name.startswith("_"))
    return "{" + ", ".join(names) + "}"


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
