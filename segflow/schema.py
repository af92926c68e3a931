"""The Parquet tables segflow writes, column by column.

Every run writes seven tables, one file per shard each (tables that do not apply to the run,
e.g. ``class_stats`` of an instance model or any metrics table of a run without ground
truth, have zero rows). The types are the ones every
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
gt_uri         string, null        the ground truth the image was evaluated against; null
                                   when the run has none or it could not be read (then
                                   ``errors`` has a ``gt`` row)
pixel_accuracy float64, null       semantic: correct / evaluated pixels of this image
miou           float64, null       semantic: mean over the classes present in its ground
                                   truth or prediction of this image's IoU
mdice          float64, null       semantic: the same mean of Dice (2|G∩P| / (|G|+|P|))
boundary_iou   float64, null       semantic: the same mean of Boundary IoU (Cheng et al.
                                   2021; boundary width 2% of the image diagonal), over the
                                   classes with boundary pixels
crs            string, null        georeferenced rasters (:mod:`segflow.raster`): the CRS,
                                   ``EPSG:n`` where it has a code, else WKT2; null for
                                   plain images
transform      list<double>, null  georeferenced rasters: the affine pixel-to-CRS transform
                                   ``[a, b, c, d, e, f]`` (rasterio's order: x = a·col +
                                   b·row + c, y = d·col + e·row + f); null for plain images
=============  ==================  =========================================================

The per-image figures above are for looking at single images (worst images, slices by
eye). Dataset figures are never their mean: :mod:`segflow.evaluation` sums the integer
counts of ``class_stats`` and pools the records of the ``coco_*`` tables.

``errors`` — one row per failure; a failed image also has an ``images`` row:

=============  ==================  =========================================================
run_id         string              the run
image_id       int64               see ``masks``
uri            string              the input that failed
stage          string              ``read``, ``decode``, ``infer``, ``encode``, or ``gt``
                                   (the image was segmented but its ground truth is
                                   missing or unusable, so it is not evaluated)
error_type     string              the exception class, e.g. ``TruncatedImageError``
message        string              the error message
occurred_at    timestamp[us, UTC]  when it happened
=============  ==================  =========================================================

``class_stats`` — semantic runs with ground truth: one row per (evaluated image, class
present in its ground truth or prediction). Pixels the ground truth ignores are not counted.
The columns are integers, so any set of images sums to its exact dataset figures:

=====================  ======  ==================================================
run_id                 string  the run
image_id               int64   see ``masks``
class_id               int32   class index in the model's class list
class_name             string  the model's name for ``class_id``
gt_pixels              int64   pixels of the class in the ground truth
pred_pixels            int64   pixels predicted as the class
intersection           int64   pixels of the class in both
union                  int64   gt_pixels + pred_pixels - intersection
boundary_intersection  int64   pixels in both boundary regions (Boundary IoU)
boundary_union         int64   pixels in either boundary region
trimap_intersection    int64   pixels of the class in both, within the band of width r
                               (``--trimap-width``, default 5) around the ground
                               truth's boundary (Trimap IoU, see
                               :mod:`segflow.metrics.boundary`)
trimap_union           int64   pixels of the class in either, within that band
soft_intersection      double  with soft metrics asked for (``--soft-metrics``): the
                               sum over the class's ground-truth pixels of its
                               predicted probability; null otherwise. Then every class
                               has a row, present or not
soft_union             double  the sum of the class's probability over all pixels, plus
                               gt_pixels, minus soft_intersection; null likewise
soft_squared_union     double  the sum of the class's squared probability over all
                               pixels, plus gt_pixels, minus soft_intersection (the
                               squared-L2 form); null likewise
instance_tp_weighted   double  with Cityscapes instance files (``masks:`` option
                               ``instances=``): the sum over the image's instances of
                               the class of their pixels predicted as the class, each
                               weighted by the class's average instance size over the
                               instance's size (iIoU, cityscapesScripts'
                               ``tpWeighted``); 0 for a class with instances that the
                               image has none of; null for a class without instances
                               (:data:`segflow.cityscapes.AVERAGE_INSTANCE_SIZE`) and
                               without instance files
instance_fn_weighted   double  likewise, of their pixels not predicted as the class
category_intersection  double  with instance files: pixels of the class in the ground
                               truth predicted as a class of its category (a whole
                               number; category IoU); null otherwise
category_tp_weighted   double  as instance_tp_weighted, for the pixels predicted as a
                               class of the instance's category (category iIoU)
category_fn_weighted   double  likewise, for the pixels predicted outside the category
=====================  ======  ==================================================

``confusion`` — semantic runs with ground truth: the image's confusion matrix, its non-zero
cells only (ignored pixels not counted); summed over images, the dataset's:

============  ======  ===================================================
run_id        string  the run
image_id      int64   see ``masks``
gt_class      int32   the ground truth's class (index in the model's classes)
pred_class    int32   the predicted class
pixels        int64   pixels of ``gt_class`` predicted as ``pred_class``
============  ======  ===================================================

``coco_detections`` — instance runs with COCO ground truth: the per-image records of
COCOeval's ``evaluateImg`` for each IoU type, one row per evaluated detection (at most 100 per
image and category, by score), enough to accumulate COCO mAP exactly
(:mod:`segflow.metrics.instance`):

=============  =======  ========================================================
run_id         string   the run
image_id       int64    see ``masks``
gt_image_id    int64    the image's id in the COCO ground truth (COCOeval orders
                        detections of equal score by it)
iou_type       string   ``segm`` or ``bbox``
category_id    int64    the ground truth's category id
rank           int32    position among the image's detections of the category, by
                        descending score (0 = best)
score          float64  detection confidence
matched_all    int32    bit t set: matched at IoU threshold 0.5 + 0.05 t, in area range
                        ``all``; likewise ``matched_small``, ``_medium``, ``_large``
ignored_all    int32    bit t set: ignored at that threshold and area range (matched
                        to a crowd or ignored object, or unmatched outside the range);
                        likewise ``ignored_small``, ``_medium``, ``_large``
=============  =======  ========================================================

``coco_ground_truth`` — one row per (evaluated image, IoU type, category with ground truth):

================  ======  ========================================================
run_id            string  the run
image_id          int64   see ``masks``
gt_image_id       int64   the image's id in the COCO ground truth
iou_type          string  ``segm`` or ``bbox``
category_id       int64   the ground truth's category id
num_gt_all        int32   objects that count (not crowd) in area range ``all``;
                          likewise ``num_gt_small``, ``num_gt_medium``, ``num_gt_large``
================  ======  ========================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from segflow.errors import SegflowError
from segflow.metrics.instance import AREA_RANGES

SCHEMA_VERSION = "2"

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
        pa.field("gt_uri", pa.string()),
        pa.field("pixel_accuracy", pa.float64()),
        pa.field("miou", pa.float64()),
        pa.field("mdice", pa.float64()),
        pa.field("boundary_iou", pa.float64()),
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),
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

# class_stats' per-class integer counts, and its soft sums (null unless asked for).
CLASS_COUNTS = (
    "gt_pixels",
    "pred_pixels",
    "intersection",
    "union",
    "boundary_intersection",
    "boundary_union",
    "trimap_intersection",
    "trimap_union",
)
CLASS_SOFT_SUMS = ("soft_intersection", "soft_union", "soft_squared_union")
# class_stats' Cityscapes instance and category sums (null without instance files).
CLASS_INSTANCE_SUMS = (
    "instance_tp_weighted",
    "instance_fn_weighted",
    "category_intersection",
    "category_tp_weighted",
    "category_fn_weighted",
)

CLASS_STATS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        *(pa.field(name, pa.int64(), nullable=False) for name in CLASS_COUNTS),
        *(pa.field(name, pa.float64()) for name in CLASS_SOFT_SUMS + CLASS_INSTANCE_SUMS),
    ]
)

CONFUSION = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("gt_class", pa.int32(), nullable=False),
        pa.field("pred_class", pa.int32(), nullable=False),
        pa.field("pixels", pa.int64(), nullable=False),
    ]
)

COCO_DETECTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("gt_image_id", pa.int64(), nullable=False),
        pa.field("iou_type", pa.string(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        *(pa.field(f"matched_{area}", pa.int32(), nullable=False) for area in AREA_RANGES),
        *(pa.field(f"ignored_{area}", pa.int32(), nullable=False) for area in AREA_RANGES),
    ]
)

COCO_GROUND_TRUTH = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("gt_image_id", pa.int64(), nullable=False),
        pa.field("iou_type", pa.string(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        *(pa.field(f"num_gt_{area}", pa.int32(), nullable=False) for area in AREA_RANGES),
    ]
)

TABLES: Mapping[str, pa.Schema] = {
    "masks": MASKS,
    "images": IMAGES,
    "errors": ERRORS,
    "class_stats": CLASS_STATS,
    "confusion": CONFUSION,
    "coco_detections": COCO_DETECTIONS,
    "coco_ground_truth": COCO_GROUND_TRUTH,
}


class SchemaError(SegflowError, ValueError):
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
    ``pyarrow.fs``/fsspec filesystem for paths. Committing the file into a run's table is
    the caller's business (:mod:`segflow.store`: a Delta transaction).
    """
    if not table.schema.equals(_schema(name), check_metadata=False):
        raise SchemaError(f"table {name!r} does not match its schema:\n{table.schema}")
    with table_writer(name, where, filesystem) as writer:
        writer.write_table(table.replace_schema_metadata(writer.schema.metadata))


def table_writer(name: str, where: Any, filesystem: Any = None) -> Any:
    """A ``pyarrow.parquet.ParquetWriter`` of table ``name``'s files as :func:`write_table`
    writes them, for a caller that writes one in parts (a row group each ``write_batch``)."""
    import pyarrow.parquet as pq

    metadata = {b"segflow.schema_version": SCHEMA_VERSION.encode(), b"segflow.table": name.encode()}
    return pq.ParquetWriter(
        where, _schema(name).with_metadata(metadata), filesystem=filesystem, compression="zstd"
    )


def read_table(name: str, where: Any, filesystem: Any = None) -> pa.Table:
    """Read a segflow Parquet file, refusing files of another table or schema version."""
    import pyarrow.parquet as pq

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
    from segflow import rle  # a reader of the tables starts without it

    return rle.decode({"size": size, "counts": counts})


def _schema(name: str) -> pa.Schema:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; segflow writes {sorted(TABLES)}") from None
