"""The manifest: the ordered list of image URIs a run works on, and its shards.

A manifest comes from listing a location through fsspec (a folder, ``file://``, ``s3://``
prefix, or a glob) or from a manifest file the user wrote (``.txt`` one URI a line, ``.csv``
with a ``uri`` column, ``.parquet`` with a ``uri`` column). A listing is sorted; a manifest
file keeps its order, and may name no URI twice and none empty.

Millions of URIs never become millions of Python objects: :func:`build_manifest` lists a page
at a time (local folders by ``os.scandir``, S3 by ``list_objects_v2`` pages; other fsspec
stores fall back to ``fs.find``, which holds the whole listing) and appends each page to a
Parquet file, in row groups of :data:`ROW_GROUP_ROWS` URIs. A listing that arrives unsorted
(a local folder's, whose order is the file system's) is sorted by DuckDB under
:data:`SORT_MEMORY`, spilling to a temporary folder beside the output; S3 lists keys in
order, so its listing is written as it comes. A shard is a row range of that file, identified
by its index, and :class:`ManifestReader` reads one shard's URIs without reading the rest.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from segflow.errors import SegflowError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
ROW_GROUP_ROWS = 8192
LIST_PAGE = 1000  # objects per listing request: S3's maximum
SORT_MEMORY = "256MB"


class ManifestError(SegflowError, ValueError):
    """The input names no images, or a manifest file is malformed."""


@dataclass(frozen=True)
class Shard:
    """Images ``[start, stop)`` of the manifest."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"

    def __len__(self) -> int:
        return self.stop - self.start


def check_input(location: str) -> None:
    """Fail as :func:`build_manifest` would where ``location`` names nothing, without listing
    it (a corpus of millions of objects takes minutes to list)."""
    _located(location)


def build_manifest(
    location: str,
    dest: str,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    *,
    page_size: int = LIST_PAGE,
) -> int:
    """Write the image URIs named by ``location`` (see the module docstring) to the local
    Parquet file ``dest`` (column ``uri``); returns how many there are. Where ``location``
    is bad, raises :class:`ManifestError`, and ``dest`` may hold part of a manifest."""
    fs, path, kind = _located(location)
    if kind == "manifest":
        return _copy_manifest_file(location, fs, path, dest)
    wanted = tuple(s.lower() for s in suffixes)
    pattern = re.compile(glob_translate(path)) if kind == "glob" else None
    folder = os.path.dirname(os.path.abspath(dest))
    with tempfile.TemporaryDirectory(prefix=".manifest-", dir=folder) as tmp:
        listed = os.path.join(tmp, "listed.parquet")
        in_order, previous = True, ""
        with _Writer(listed) as writer:
            try:
                for page in _pages(fs, path, kind, page_size):
                    uris = [
                        fs.unstrip_protocol(p)
                        for p in page
                        if p.lower().endswith(wanted) and (pattern is None or pattern.match(p))
                    ]
                    if uris:
                        in_order = in_order and previous < uris[0] and _ascending(uris)
                        previous = uris[-1]
                        writer.write(pa.array(uris, pa.string()))
            except ManifestError:
                raise
            except Exception as exc:
                raise _unlistable(location, exc) from exc
        if not writer.rows:
            looked = ", ".join(wanted)
            raise ManifestError(f"input {location!r} holds no images (looked for {looked})")
        if in_order:
            os.replace(listed, dest)
        else:
            with _duckdb(tmp) as db:
                db.execute(
                    f"COPY (SELECT uri FROM read_parquet({_sql(listed)}) ORDER BY uri) "
                    f"TO {_sql(dest)} "
                    f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})"
                )
    return writer.rows


class ManifestReader:
    """The URIs of a manifest Parquet file by row range, decoding only the row groups a range
    touches (and keeping the last one: consecutive shards mostly share it). It owns ``file``
    and closes it with :meth:`close` or at the end of a ``with`` block."""

    def __init__(self, file: BinaryIO) -> None:
        self._opened = file
        self._file = pq.ParquetFile(file)
        groups = (self._file.metadata.row_group(i) for i in range(self._file.num_row_groups))
        self._starts = list(itertools.accumulate((g.num_rows for g in groups), initial=0))
        self._cached: tuple[int, pa.Array] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def uris(self, shard: Shard) -> list[str]:
        pieces = []
        group = bisect.bisect_right(self._starts, shard.start) - 1
        while shard.stop > self._starts[group] and group < len(self._starts) - 1:
            column = self._row_group(group)
            first = max(shard.start - self._starts[group], 0)
            pieces.extend(column.slice(first, shard.stop - self._starts[group] - first).to_pylist())
            group += 1
        return pieces

    def close(self) -> None:
        self._opened.close()

    def __enter__(self) -> ManifestReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _row_group(self, group: int) -> pa.Array:
        if self._cached is None or self._cached[0] != group:
            table = self._file.read_row_group(group, columns=["uri"])
            self._cached = (group, table.column("uri").combine_chunks())
        return self._cached[1]


def _located(location: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """The store and path of ``location`` and what it is: a glob, a folder, a manifest file or
    one image."""
    try:
        fs, path = fsspec.core.url_to_fs(location)
        if fsspec.core.has_magic(path):
            kind = "glob"
        elif fs.isdir(path):
            kind = "folder"
        elif fs.isfile(path):
            kind = "manifest" if path.lower().endswith(MANIFEST_SUFFIXES) else "image"
        else:
            raise ManifestError(f"input {location!r} does not exist")
    except ManifestError:
        raise
    except Exception as exc:
        raise _unlistable(location, exc) from exc
    return fs, path, kind


def _unlistable(location: str, exc: Exception) -> ManifestError:
    # Each fsspec backend raises its own types (botocore's NoCredentialsError, aiohttp
    # errors, ...); the user needs to know which input failed and why, whatever the type.
    return ManifestError(f"cannot list input {location!r}: {type(exc).__name__}: {exc}")


def _pages(fs, path: str, kind: str, page_size: int) -> Iterator[list[str]]:
    """The store's paths (without protocol) of every file under ``path``, a page at a time;
    a glob lists the folder above its first wildcard, as deep as the pattern reaches."""
    if kind == "image":
        yield [path]
        return
    root, depth = (path, None) if kind == "folder" else _glob_root(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if isinstance(fs, LocalFileSystem):
        yield from _local_pages(root, depth, page_size)
    elif protocols & {"s3", "s3a"}:
        yield from _s3_pages(fs, root, page_size)
    else:
        found = fs.find(root, maxdepth=depth)
        for start in range(0, len(found), page_size):
            yield found[start : start + page_size]


def _glob_root(pattern: str) -> tuple[str, int | None]:
    """The folder above a glob's first wildcard, and how many levels below it the glob can
    match (None where ``**`` matches any depth), as ``fsspec``'s ``glob`` computes them."""
    magic = min(i for i in (pattern.find(c) for c in "*?[") if i >= 0)
    root = pattern[: pattern.rfind("/", 0, magic) + 1]
    return root, None if "**" in pattern else pattern[len(root) :].count("/") + 1


def _local_pages(root: str, depth: int | None, page_size: int) -> Iterator[list[str]]:
    # As fsspec's find: symlinks are listed as files and not followed into.
    page: list[str] = []
    folders = [(root, 1)]
    while folders:
        folder, level = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    page.append(entry.path)
                    if len(page) == page_size:
                        yield page
                        page = []
                elif depth is None or level < depth:
                    folders.append((entry.path, level + 1))
    if page:
        yield page


def _s3_pages(fs, root: str, page_size: int) -> Iterator[list[str]]:
    bucket, key, _ = fs.split_path(root)
    if not bucket:
        raise ValueError("a glob must name its bucket")
    request = {
        "Bucket": bucket,
        "Prefix": f"{key.rstrip('/')}/" if key else "",
        "MaxKeys": page_size,
        **fs.req_kw,
    }
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **request)
        # Keys ending in "/" are folder markers, not files.
        yield [f"{bucket}/{c['Key']}" for c in page.get("Contents", []) if c["Key"][-1:] != "/"]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _ascending(uris: list[str]) -> bool:
    # Python orders str by code point, which is the UTF-8 byte order DuckDB sorts by.
    return all(a < b for a, b in itertools.pairwise(uris))


def _copy_manifest_file(location: str, fs, path: str, dest: str) -> int:
    empty = 0
    try:
        with _Writer(dest) as writer:
            for column in _manifest_file_columns(location, fs, path):
                empty += column.null_count + (pc.sum(pc.equal(column, "")).as_py() or 0)
                writer.write(column)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {location!r} cannot be read: {exc}") from exc
    if empty:
        raise ManifestError(f"manifest {location!r} has {empty} empty uri(s)")
    if not writer.rows:
        raise ManifestError(f"manifest {location!r} lists no images")
    folder = os.path.dirname(os.path.abspath(dest))
    with tempfile.TemporaryDirectory(prefix=".manifest-", dir=folder) as tmp, _duckdb(tmp) as db:
        extra, example = db.execute(
            "SELECT coalesce(sum(n - 1), 0), min(uri) FROM (SELECT uri, count(*) AS n "
            f"FROM read_parquet({_sql(dest)}) GROUP BY uri HAVING n > 1)"
        ).fetchone()
    if extra:
        raise ManifestError(
            f"manifest {location!r} lists {extra} uri(s) more than once (e.g. {example!r})"
        )
    return writer.rows


def _manifest_file_columns(location: str, fs, path: str) -> Iterator[pa.Array]:
    """The ``uri`` column of a manifest file, a batch at a time, in the file's order."""
    lower = path.lower()
    if lower.endswith(".txt"):
        with fs.open(path, "rt", encoding="utf-8") as f:
            while lines := f.readlines(1 << 22):
                uris = (line.strip() for line in lines)
                yield pa.array([u for u in uris if u and not u.startswith("#")], pa.string())
        return
    with fs.open(path, "rb") as f:
        if lower.endswith(".parquet"):
            table = pq.ParquetFile(f)
            columns = table.schema_arrow.names
            batches = (
                table.iter_batches(ROW_GROUP_ROWS, columns=["uri"]) if "uri" in columns else ()
            )
        else:
            columns = next(csv.reader([f.readline().decode("utf-8-sig")]), [])
            f.seek(0)
            only_uri = pa_csv.ConvertOptions(
                column_types={"uri": pa.string()}, include_columns=["uri"]
            )
            batches = pa_csv.open_csv(f, convert_options=only_uri) if "uri" in columns else ()
        if "uri" not in columns:
            raise ManifestError(f"manifest {location!r} has no 'uri' column (columns: {columns})")
        for batch in batches:
            yield batch.column("uri").cast(pa.string())


class _Writer:
    """Appends URI arrays to a manifest Parquet file in row groups of ROW_GROUP_ROWS."""

    def __init__(self, path: str) -> None:
        self._parquet = pq.ParquetWriter(
            path, pa.schema([("uri", pa.string())]), compression="zstd"
        )
        self._pending: list[pa.Array] = []
        self.rows = 0

    def write(self, uris: pa.Array) -> None:
        self._pending.append(uris)
        self.rows += len(uris)
        if sum(map(len, self._pending)) >= ROW_GROUP_ROWS:
            self._flush(whole_groups_only=True)

    def _flush(self, whole_groups_only: bool) -> None:
        column = pa.chunked_array(self._pending, pa.string())
        ready = len(column) // ROW_GROUP_ROWS * ROW_GROUP_ROWS if whole_groups_only else len(column)
        if ready:
            table = pa.table({"uri": column.slice(0, ready)})
            self._parquet.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._pending = column.slice(ready).chunks

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._flush(whole_groups_only=False)
        self._parquet.close()


def _duckdb(tmp: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB that sorts and groups within SORT_MEMORY, spilling the rest into ``tmp``."""
    db = duckdb.connect(config={"memory_limit": SORT_MEMORY, "temp_directory": tmp})
    db.execute("SET enable_progress_bar = false")  # it would print to the caller's stdout
    return db


def _sql(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def shards(manifest_length: int, shard_size: int) -> Iterator[Shard]:
    """Deterministic shards: the same manifest and size give the same shards every time."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    for index, start in enumerate(range(0, manifest_length, shard_size)):
        yield Shard(index, start, min(start + shard_size, manifest_length))
