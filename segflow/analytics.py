"""Looking at a run's outputs: its tables in DuckDB or Polars, with the mask functions SQL
lacks, and any image drawn with its masks.

:func:`connect` opens a DuckDB connection in which every table of :mod:`segflow.schema` is a
view of the run's committed shards and the functions below work on ``masks.counts``; it
reads nothing but the run unless asked to (``allow_external``)::

    db = connect("out/camvid")
    db.sql("SELECT class_name, rle_bbox(counts, height, width) FROM masks").pl()

=============================================  =========  ==================================
SQL (DuckDB; :func:`register_functions`)       returns    the mask's
=============================================  =========  ==================================
``rle_area(counts, height, width)``            BIGINT     area, pixels
``rle_bbox(counts, height, width)``            DOUBLE[]   tight box ``[x, y, w, h]``
``rle_iou(counts_a, counts_b, height, width)`` DOUBLE     IoU with the other mask of that
                                                          size (0 when they do not overlap)
``rle_png(counts, height, width)``             BLOB       1-bit PNG (mask pixels white)
=============================================  =========  ==================================

The Python functions of the same names build the Polars expressions that compute the same,
e.g. ``masks.with_columns(box=rle_bbox())``. Both evaluate whole batches with
:mod:`segflow.rle` (pycocotools' results, to the bit), and a NULL argument gives NULL.
``docs/analytics.md`` has the queries (DuckDB, Polars, Spark) that its tests run.

:func:`overlay` draws one image of a run with its masks over it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa

from segflow.errors import SegflowError
from segflow.evaluation import open_run, tables_of_images

if TYPE_CHECKING:
    import polars as pl
    from PIL import Image, ImageDraw, ImageFont

    from segflow import rle

__all__ = [
    "AnalyticsError",
    "connect",
    "overlay",
    "register_functions",
    "rle_area",
    "rle_bbox",
    "rle_iou",
    "rle_png",
]


class AnalyticsError(SegflowError, ValueError):
    """A request about a run that cannot be answered; the message names what and why."""


def connect(
    location: str, *, allow_external: bool = False, tables: Collection[str] | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the run's tables as views (see
    :func:`~segflow.evaluation.open_run` for ``location``), the mask functions, and the
    session time zone set to UTC so that ``date_trunc`` buckets the UTC timestamps the run
    wrote, wherever the query runs.

    The views scan the committed shards' files as a query needs them
    (:meth:`~segflow.evaluation.Run.connect`): nothing is read until a query runs. The
    connection reads the run's tables and nothing else: no files (``read_text``, ``COPY``,
    ``ATTACH``), no extensions, and its settings are locked (:func:`segflow.sql.lock_down`),
    so it can be handed SQL from anyone. Pass
    ``allow_external=True`` for SQL you trust to also reach the machine's files (DuckDB's
    usual connection, settings unlocked), and ``tables`` for views of those tables only
    (:func:`segflow.sql.tables_named` finds those SQL reads)."""
    db = open_run(location).connect(allow_external=allow_external, tables=tables)
    register_functions(db)
    return db


def register_functions(db: duckdb.DuckDBPyConnection) -> None:
    """Add ``rle_area``, ``rle_bbox``, ``rle_iou`` and ``rle_png`` to any DuckDB connection,
    e.g. one that reads the Parquet of several runs."""
    for name, function in _FUNCTIONS.items():
        db.create_function(
            name, function.on_arrow(), list(function.arguments), function.sql_type, type="arrow"
        )


# --------------------------------------------------------------------------------------------
# The functions, on batches of Python values: one segflow.rle call per batch where it has one.


@dataclass(frozen=True)
class _Function:
    kernel: Callable[..., list]
    arguments: tuple[str, ...]  # SQL types
    arrow_type: pa.DataType
    sql_type: str

    def on_arrow(self) -> Callable[..., pa.Array]:
        # functools.wraps keeps the kernel's signature, from which DuckDB takes the arity.
        @functools.wraps(self.kernel)
        def call(*columns: pa.Array | pa.ChunkedArray) -> pa.Array:
            return _evaluate(self, columns)

        return call


# segflow.rle and PIL are imported where a mask is computed on: `segflow query` starts
# without them.


def _rles(counts: list[str], heights: list[int], widths: list[int]) -> list[rle.RLE]:
    return [{"size": [h, w], "counts": c} for c, h, w in zip(counts, heights, widths, strict=True)]


def _areas(counts: list[str], heights: list[int], widths: list[int]) -> list[int]:
    from segflow import rle

    return rle.area(_rles(counts, heights, widths)).astype(np.int64).tolist()


def _bboxes(counts: list[str], heights: list[int], widths: list[int]) -> list[list[float]]:
    from segflow import rle

    return rle.to_bbox(_rles(counts, heights, widths)).tolist()


def _ious(a: list[str], b: list[str], heights: list[int], widths: list[int]) -> list[float]:
    from segflow import rle

    return rle.iou_pairs(_rles(a, heights, widths), _rles(b, heights, widths)).tolist()


def _pngs(counts: list[str], heights: list[int], widths: list[int]) -> list[bytes]:
    from PIL import Image

    from segflow import rle

    encoded = []
    for mask in _rles(counts, heights, widths):
        buffer = io.BytesIO()
        Image.fromarray(rle.decode(mask).astype(bool)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


_FUNCTIONS = {
    "rle_area": _Function(_areas, ("VARCHAR", "BIGINT", "BIGINT"), pa.int64(), "BIGINT"),
    "rle_bbox": _Function(
        _bboxes, ("VARCHAR", "BIGINT", "BIGINT"), pa.list_(pa.float64()), "DOUBLE[]"
    ),
    "rle_iou": _Function(_ious, ("VARCHAR", "VARCHAR", "BIGINT", "BIGINT"), pa.float64(), "DOUBLE"),
    "rle_png": _Function(_pngs, ("VARCHAR", "BIGINT", "BIGINT"), pa.binary(), "BLOB"),
}


def _evaluate(function: _Function, columns: Sequence[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """The function over a batch of Arrow columns; NULL where any argument is NULL."""
    values = [column.to_pylist() for column in columns]
    complete = [i for i, row in enumerate(zip(*values, strict=True)) if None not in row]
    results = function.kernel(*([v[i] for i in complete] for v in values)) if complete else []
    out: list[Any] = [None] * len(values[0])
    for i, result in zip(complete, results, strict=True):
        out[i] = result
    return pa.array(out, function.arrow_type)


def _polars(name: str, *columns: str | pl.Expr) -> pl.Expr:
    import polars as pl

    function = _FUNCTIONS[name]
    return pl.map_batches(
        [pl.col(c) if isinstance(c, str) else c for c in columns],
        lambda series: pl.Series(_evaluate(function, [s.to_arrow() for s in series])),
        return_dtype=pl.Series(pa.nulls(0, function.arrow_type)).dtype,
        is_elementwise=True,
    ).alias(name)


def rle_area(
    counts: str | pl.Expr = "counts",
    height: str | pl.Expr = "height",
    width: str | pl.Expr = "width",
) -> pl.Expr:
    """Polars: each mask's area in pixels (Int64), as SQL's ``rle_area``."""
    return _polars("rle_area", counts, height, width)


def rle_bbox(
    counts: str | pl.Expr = "counts",
    height: str | pl.Expr = "height",
    width: str | pl.Expr = "width",
) -> pl.Expr:
    """Polars: each mask's tight box ``[x, y, w, h]`` (List(Float64)), as SQL's ``rle_bbox``."""
    return _polars("rle_bbox", counts, height, width)


def rle_iou(
    counts_a: str | pl.Expr,
    counts_b: str | pl.Expr,
    height: str | pl.Expr = "height",
    width: str | pl.Expr = "width",
) -> pl.Expr:
    """Polars: IoU of two masks of one size, row by row (Float64), as SQL's ``rle_iou``."""
    return _polars("rle_iou", counts_a, counts_b, height, width)


def rle_png(
    counts: str | pl.Expr = "counts",
    height: str | pl.Expr = "height",
    width: str | pl.Expr = "width",
) -> pl.Expr:
    """Polars: each mask as a 1-bit PNG (Binary), as SQL's ``rle_png``."""
    return _polars("rle_png", counts, height, width)


# --------------------------------------------------------------------------------------------
# One image with its masks.


def overlay(
    location: str, image_id: int, *, alpha: float = 0.5, legend: bool = True
) -> Image.Image:
    """Image ``image_id`` of the run at ``location`` (read from its URI) with its masks over
    it, as an RGB image of the same size.

    Semantic runs: each class in its colour, the same in every image, with a legend of the
    image's classes in the top-left corner unless ``legend`` is false. Instance runs: each
    detection in its own colour, the best-scored on top, with its box outlined and labelled
    with its class and score. A mask's pixels become ``(1 - alpha) * image + alpha * colour``;
    pixels outside every mask, box, label and legend keep the image's colour.
    """
    if not 0 <= alpha <= 1:
        raise AnalyticsError(f"alpha must be between 0 and 1, got {alpha}")
    from PIL import Image, ImageDraw, ImageFont

    from segflow import palette, rle
    from segflow.decode import decode_rgb

    run = open_run(location)
    with run.connect(tables=("images", "masks")) as db:
        found = tables_of_images(db, ["images", "masks"], [image_id])
    uris = found["images"].column("uri").to_pylist()
    if not uris:
        raise AnalyticsError(f"{run.uri} has no image with id {image_id} in its images table")
    [uri] = uris
    rows = found["masks"].to_pylist()
    with fsspec.open(uri, "rb") as f:
        pixels = decode_rgb(f.read(), name=uri)
    height, width = pixels.shape[:2]
    for row in rows:
        if (row["height"], row["width"]) != (height, width):
            raise AnalyticsError(
                f"{uri} decodes to {width}x{height} pixels, but its masks in {run.uri} are "
                f"{row['width']}x{row['height']}: the image changed after the run"
            )

    instances = any(row["instance"] is not None for row in rows)
    # Drawn last is on top: the best detection (rank 0) over the others.
    rows.sort(key=lambda row: -row["instance"] if instances else row["class_id"])
    indices = [row["instance"] if instances else row["class_id"] for row in rows]
    colours = [palette.colour(index) for index in indices]
    painted = np.full((height, width), -1, np.int64)
    for row, index in zip(rows, indices, strict=True):
        painted[rle.decode({"size": [height, width], "counts": row["counts"]}).astype(bool)] = index

    picture = Image.fromarray(palette.tint(pixels, painted, alpha))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, min(height, width) // 30))
    if instances:
        line = max(2, min(height, width) // 300)
        for row, colour in zip(rows, colours, strict=True):
            x, y, w, h = row["bbox"]
            draw.rectangle((x, y, x + w, y + h), outline=colour, width=line)
            label = f"{row['class_name']} {row['score']:.2f}"
            # Above the box, or inside it when the box touches the top of the image.
            anchor = "ld" if draw.textbbox((x, y), label, font=font, anchor="ld")[1] >= 0 else "la"
            box = draw.textbbox((x, y), label, font=font, anchor=anchor)
            draw.rectangle(box, fill=colour)
            draw.text((x, y), label, font=font, anchor=anchor, fill=_ink(colour))
    elif legend and rows:
        entries = [(colour, row["class_name"]) for row, colour in zip(rows, colours, strict=True)]
        _draw_legend(draw, font, entries)
    return picture


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (Rec. 601 luma)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 128 else (255, 255, 255)


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont,
    entries: list[tuple[tuple[int, int, int], str]],
) -> None:
    size = draw.textbbox((0, 0), "Ag", font=font)[3]  # a line's height, swatch included
    pad = max(2, size // 3)
    text_width = max(draw.textlength(name, font=font) for _, name in entries)
    right = pad + size + pad + int(text_width) + pad
    draw.rectangle((0, 0, right, pad + len(entries) * (size + pad)), fill=(0, 0, 0))
    for i, (colour, name) in enumerate(entries):
        top = pad + i * (size + pad)
        draw.rectangle((pad, top, pad + size - 1, top + size - 1), fill=colour)
        draw.text((pad + size + pad, top), name, font=font, fill=(255, 255, 255))
