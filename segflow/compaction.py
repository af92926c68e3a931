"""Compaction's rewrite of one table: its many shard files as few large files, sorted.

:func:`write_sorted` reads a table's committed files with DuckDB and writes their rows,
ordered by ``image_id`` (one image's rows are one range, and a reader of a few images skips
the other row groups by their statistics), into files of about ``target_size`` bytes in row
groups of about :data:`ROW_GROUP` rows, each a segflow Parquet file of the table
(:func:`segflow.schema.table_writer`), named ``compacted-<uuid>-NNNNN.parquet``.

DuckDB sorts within :data:`MEMORY_BYTES`, spilling the rest to a local temporary folder, a
range of image_id at a time (:data:`RANGE_BYTES` of Parquet), so a table of any size is
sorted in that budget. delta-rs' own ``optimize.z_order`` sorts with DataFusion, whose
external sort failed a 1M-image run's ``masks`` at random whatever its budget (448 MiB: 3
failures in 4 tries, 640 MiB: 1 in 1; "Resources exhausted" while merging its spills,
apache/datafusion#16979). This costs time: that masks table (1.6 GB of Parquet, 3,907
files) took 345 s and 969 MiB peak RSS, where a z_order that succeeded took 75 s, 843 MiB.

Nothing here commits: the caller (:meth:`segflow.store.RunStore.compact`) adds the files
returned in one Delta transaction that removes those they replace. Until then the files are
in no table, so a compaction killed while it writes leaves strays that vacuum removes.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa

from segflow import schema
from segflow.sql import expose_files, sql_string

if TYPE_CHECKING:
    from segflow.store import DataFile

ROW_GROUP = 100_000
# DuckDB's memory limit; it spills the rest to a local temporary folder.
MEMORY_BYTES = 384 * 2**20
# Parquet bytes of the table sorted at a time: the rows of one range of image_id.
RANGE_BYTES = 64 * 2**20
# Files a query reads at once: DuckDB keeps about 4 KB a column of each file a scan has read
# until the scan ends (a 1M-image run's masks: 3,900 files, about 200 MB).
PART_FILES = 256
# image_id is a 63-bit hash of the URI (segflow.schema.image_id_for): uniform, so ranges of
# equal width hold about as many rows.
_IDS = 2**63


def write_sorted(
    fs: fsspec.AbstractFileSystem,
    name: str,
    folder: str,
    files: list[str],
    data_bytes: int,
    target_size: int,
) -> list[DataFile]:
    """Write the rows of table ``name``'s ``files`` (URIs or local paths on ``fs``, of
    ``data_bytes`` in all) sorted by ``image_id`` into new files in ``folder`` (the
    table's, on ``fs``); what was written, for the table's log (none for files without
    rows)."""
    import duckdb

    from segflow.store import DataFile

    written: list[DataFile] = []
    prefix = f"compacted-{uuid.uuid4().hex[:8]}"
    with (
        tempfile.TemporaryDirectory(prefix="segflow-compact-") as spill,
        duckdb.connect() as db,
    ):
        db.execute("SET enable_progress_bar = false")  # it would print to stdout
        db.execute(f"SET memory_limit = '{MEMORY_BYTES // 2**20}MiB'")
        db.execute(f"SET temp_directory = {sql_string(spill)}")
        # A range's rows are gathered in a table of a database on disk: an in-memory
        # database's tables are not spilled (the range's rows must fit the limit).
        db.execute(f"ATTACH {sql_string(spill + '/scratch.duckdb')} AS scratch")
        parts = {
            str(start): files[start : start + PART_FILES]
            for start in range(0, len(files), PART_FILES)
        }
        exposed = expose_files(db, fs, parts, natively=True)
        sources = [part.source() for part in exposed.values()]
        batches = _sorted_batches(db, sources, max(1, math.ceil(data_bytes / RANGE_BYTES)))
        batch = next(batches, None)
        while batch is not None:
            relative = f"{prefix}-{len(written):05d}.parquet"
            count, lowest = 0, batch.column("image_id")[0].as_py()
            with fs.open(f"{folder}/{relative}", "wb") as out:
                with schema.table_writer(name, out) as writer:
                    while batch is not None and out.tell() < target_size:
                        writer.write_batch(batch.cast(writer.schema))
                        count, highest = count + batch.num_rows, batch.column("image_id")[-1]
                        batch = next(batches, None)
                size = out.tell()
            written.append(DataFile.written(name, relative, size, count, (lowest, highest.as_py())))
    return written


def _sorted_batches(db: Any, sources: list[str], ranges: int) -> Iterator[pa.RecordBatch]:
    """The rows of the files of ``sources`` (SQL: what ``read_parquet`` reads each part
    by), ordered by image_id, sorted ``ranges`` ranges of image_id at a time: the range's
    rows of each part gathered in a table of ``db``'s (spilled as it grows), then sorted."""
    if not sources:
        return
    # Not hive partitions: a run's folder is named run=<id>.
    parts = [f"read_parquet({source}, hive_partitioning = false)" for source in sources]
    db.execute(f"CREATE TABLE scratch._range AS SELECT * FROM {parts[0]} LIMIT 0")
    width = -(-_IDS // ranges)
    for low in range(0, _IDS, width):
        for part in parts:
            db.execute(
                f"INSERT INTO scratch._range SELECT * FROM {part} WHERE image_id >= $low "
                "AND image_id < $high",
                {"low": low, "high": low + width},
            )
        yield from db.sql("SELECT * FROM scratch._range ORDER BY image_id").to_arrow_reader(
            ROW_GROUP
        )
        db.execute("DELETE FROM scratch._range")
