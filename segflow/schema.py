"""The Parquet tables segflow writes, column by column.

Every run writes three tables, one file per shard each. The types are the ones every
analytics engine reads the same way (DuckDB, Polars, Spark, pandas): no unsigned integers,
timestamps in microseconds UTC, strings as UTF-8, zstd compression. Each file carries
``segflow.schema_version`` and ``segflow.table`` in its key-value metadata, so a reader can
refuse a file it does not understand instead of misreading it.

``masks`` — one row per (image, class present) for semantic models, one row per detection
for instance models:

=============  ==================  =========================================================
column         type                meaning
=============  ==================  =========================================================
run_id         string              the run that wrote the row
image_id       int64               stable id of the image: :func:`image_id_for` of its URI
uri            string              where the image was read from
instance       int32, null         detection rank within the image (0 = highest score);
                                   null for semantic rows
class_id       int32               class index in the model's class list
class_name     string              the model's name for ``class_id``
score          float32, null       detection confidence in [0, 1]; null for semantic rows
bbox           list<double>        ``[x, y, width, height]`` in pixels, origin top-left.
                                   Semantic rows: the mask's tight box (pycocotools toBbox);
                                   instance rows: the detector's box
area           int64               mask area, pixels
counts         string              the mask as a compressed COCO RLE string (``segflow.rle``),
                                   decodable by pycocotools with ``{"size": [height, width],
                                   "counts": counts}``
height         int32               image height, pixels
width          int32               image width, pixels
model          string              the model that produced the mask
=============  ==================  =========================================================

``images`` — one row per input image, whether it succeeded or not:

=============  ==================  =========================================================
run_id         string              the run
image_id       int64               see ``masks``
uri            string              see ``masks``
status         string              ``ok`` or ``error`` (details in ``errors``)
height         int32, null         decoded height, pixels (null when decoding failed)
width          int32, null         decoded width, pixels (null when decoding failed)
num_masks      int32               rows this image has in ``masks``
read_ms        float64, null       time to fetch the bytes, milliseconds
decode_ms      float64, null       time to decode the bytes to RGB, milliseconds
infer_ms       float64, null       this image's share of its batch's forward pass, ms
encode_ms      float64, null       time to encode its masks to RLE, milliseconds
model          string              the model
processed_at   timestamp[us, UTC]  when the image finished
=============  ==================  =========================================================

``errors`` — one row per failure; a failed image also has an ``images`` row:

=============  ==================  =========================================================
run_id         string              the run
image_id       int64               see ``masks``
uri            string              the input that failed
stage          string              ``read``, ``decode``, ``infer``, ``encode`` or ``write``
error_type     string              the exception class, e.g. ``TruncatedImageError``
message        string              the error message
occurred_at    timestamp[us, UTC]  when it happened
=============  ==================  =========================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segflow import rle

SCHEMA_VERSION = "1"
STAGES = ("read", "decode", "infer", "encode", "write")

_TIMESTAMP = pa.timestamp("us", tz="UTC")

MASKS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("instance", pa.int32()),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("bbox", pa.list_(pa.float64()), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("counts", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
)

IMAGES = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("num_masks", pa.int32(), nullable=False),
        pa.field("read_ms", pa.float64()),
        pa.field("decode_ms", pa.float64()),
        pa.field("infer_ms", pa.float64()),
        pa.field("encode_ms", pa.float64()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("processed_at", _TIMESTAMP, nullable=False),
    ]
)

ERRORS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("occurred_at", _TIMESTAMP, nullable=False),
    ]
)

TABLES: Mapping[str, pa.Schema] = {"masks": MASKS, "images": IMAGES, "errors": ERRORS}


class SchemaError(ValueError):
    """A table or file does not match segflow's Parquet schema."""


def image_id_for(uri: str) -> int:
    """A stable, non-negative 63-bit id for an image URI.

    Derived from the URI alone, so the same image gets the same id in every run and shard
    without coordination (1M images collide with probability about 5e-8).
    """
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def table_from_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build table ``name`` from dict rows, checking every column against its schema."""
    schema = _schema(name)
    rows = list(rows)
    if not rows:
        return schema.empty_table()
    names = set(schema.names)
    for row in rows:
        if row.keys() != names:
            raise SchemaError(
                f"table {name!r}: a row lacks {sorted(names - row.keys())} "
                f"and has unknown {sorted(row.keys() - names)}"
            )
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise SchemaError(f"table {name!r}: {exc}") from exc
    # pyarrow keeps nulls in non-nullable fields without complaint; readers then disagree.
    for column in schema:
        if not column.nullable and table.column(column.name).null_count:
            raise SchemaError(f"table {name!r}: column {column.name!r} must not be null")
    return table


def write_table(name: str, table: pa.Table, where: Any, filesystem: Any = None) -> None:
    """Write ``table`` as Parquet (zstd, schema version in the metadata).

    ``where`` is a path or a writable binary file object; ``filesystem`` an optional
    ``pyarrow.fs``/fsspec filesystem for paths. Atomic commit of shard files is the caller's
    business (write under a temporary name, then rename).
    """
    schema = _schema(name)
    if not table.schema.equals(schema, check_metadata=False):
        raise SchemaError(f"table {name!r} does not match its schema:\n{table.schema}")
    metadata = {b"segflow.schema_version": SCHEMA_VERSION.encode(), b"segflow.table": name.encode()}
    table = table.replace_schema_metadata(metadata)
    pq.write_table(table, where, filesystem=filesystem, compression="zstd")


def read_table(name: str, where: Any, filesystem: Any = None) -> pa.Table:
    """Read a segflow Parquet file, refusing files of another table or schema version."""
    table = pq.read_table(where, filesystem=filesystem)
    metadata = table.schema.metadata or {}
    found_name = metadata.get(b"segflow.table", b"").decode()
    found_version = metadata.get(b"segflow.schema_version", b"").decode()
    if found_name != name:
        raise SchemaError(f"{where}: holds table {found_name or 'unknown'!r}, not {name!r}")
    if found_version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {found_version or 'missing'!r}; "
            f"this segflow reads version {SCHEMA_VERSION}"
        )
    return table


def mask_from_row(row: Mapping[str, Any]) -> np.ndarray:
    """Decode one ``masks`` row (a dict, e.g. from ``Table.to_pylist()``) to an HxW uint8 mask."""
    try:
        size = [int(row["height"]), int(row["width"])]
        counts = row["counts"]
    except KeyError as exc:
        raise SchemaError(f"a masks row needs height, width and counts; missing {exc}") from None
    return rle.decode({"size": size, "counts": counts})


def _schema(name: str) -> pa.Schema:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; segflow writes {sorted(TABLES)}") from None
