"""The manifest: the ordered list of image URIs a run works on, and its shards.

A manifest comes from listing a location through fsspec (a folder, ``file://``, ``s3://``
prefix, or a glob) or from a manifest file the user wrote (``.txt`` one URI a line, ``.csv``
with a ``uri`` column, ``.parquet`` with a ``uri`` column). It is held as one Arrow string
array — about the size of the URIs themselves — so a million-image corpus plans in a few
hundred MB at most, and shards are slices of it, identified by their index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from segflow.errors import SegflowError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


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


def build_manifest(location: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> pa.Array:
    """The sorted image URIs named by ``location`` (see the module docstring)."""
    fs, path, kind = _located(location)
    if kind == "manifest":
        return _read_manifest_file(location, fs, path)
    try:
        paths = {"glob": fs.glob, "folder": fs.find, "image": lambda p: [p]}[kind](path)
    except Exception as exc:
        raise _unlistable(location, exc) from exc
    wanted = tuple(s.lower() for s in suffixes)
    uris = sorted(fs.unstrip_protocol(p) for p in paths if p.lower().endswith(wanted))
    if not uris:
        raise ManifestError(f"input {location!r} holds no images (looked for {', '.join(wanted)})")
    return pa.array(uris, pa.string())


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


def _read_manifest_file(location: str, fs, path: str) -> pa.Array:
    lower = path.lower()
    try:
        if lower.endswith(".txt"):
            with fs.open(path, "rt", encoding="utf-8") as f:
                uris = [line.strip() for line in f]
            column = pa.array([u for u in uris if u and not u.startswith("#")], pa.string())
        else:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f) if lower.endswith(".parquet") else pa_csv.read_csv(f)
            if "uri" not in table.column_names:
                raise ManifestError(
                    f"manifest {location!r} has no 'uri' column (columns: {table.column_names})"
                )
            column = table.column("uri").combine_chunks().cast(pa.string())
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {location!r} cannot be read: {exc}") from exc
    if column.null_count:
        raise ManifestError(f"manifest {location!r} has {column.null_count} empty uri(s)")
    if len(column) == 0:
        raise ManifestError(f"manifest {location!r} lists no images")
    duplicates = len(column) - len(pc.unique(column))
    if duplicates:
        raise ManifestError(f"manifest {location!r} lists {duplicates} uri(s) more than once")
    return column


def shards(manifest_length: int, shard_size: int) -> Iterator[Shard]:
    """Deterministic shards: the same manifest and size give the same shards every time."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    for index, start in enumerate(range(0, manifest_length, shard_size)):
        yield Shard(index, start, min(start + shard_size, manifest_length))
