"""Georeferenced label rasters out: ``segflow export-raster RUN DIR``.

One Cloud-Optimized GeoTIFF per georeferenced raster of a semantic run (an image of the
``images`` table with a ``crs`` and ``transform`` that was segmented), on the raster's own
grid: its CRS, transform, height and width. Band 1 holds each pixel's class id, the
``class_id`` of the ``masks`` row that covers it.

- Type: ``uint8`` when every class id fits in 0–254, else ``uint16`` (ids up to 65534); the
  same for every raster of the run, decided by the run's classes (``evaluation.json``'s
  list where the run has one, else the largest ``class_id`` of its masks).
- Nodata: the type's largest value (255, or 65535), on the pixels that no mask covers. A
  semantic run gives every valid pixel a class, so these are exactly the input's invalid
  pixels (its GDAL dataset mask). The top value rather than 0 with classes shifted up by
  one: a pixel's value stays the class id of the masks table and the model card, with no
  offset for a reader to know.
- Colour table: each class in :func:`segflow.palette.colour` (the colours of ``segflow
  show`` and ``segflow report``), nodata transparent.
- Class names: band 1's metadata items ``CLASS_<id>=<name>`` (``gdalinfo`` lists them,
  rasterio reads them as ``tags(1)``), its description ``class``.
- Layout: GDAL's COG driver (``LAYOUT=COG`` in the ``IMAGE_STRUCTURE`` metadata): 512 × 512
  tiles, DEFLATE, overviews halving down to one tile, resampled by ``MODE`` (an overview
  pixel is the commonest class of the pixels it covers; a mean of class ids would be
  another class).

Files: ``DIR/<stem>.tif`` for a raster whose URI is ``.../<stem>.<ext>``; a stem that an
earlier raster of the run (by ``image_id``) took gets ``-<image_id>`` added. ``DIR`` is a
local folder or any fsspec URL (``s3://...``): each file is written in a local temporary
folder and then put there whole, so a reader never sees a half-written COG.

Memory: the run's masks are read in batches, ordered by image (DuckDB sorts, spilling to
disk as it must), and one raster is built at a time. Its masks are held as their runs'
bounds (two int64 per run of ones), and the label raster is decoded from them a strip of
:data:`STRIP_COLUMNS` columns at a time — COCO RLE is column-major, so a strip is a
contiguous range of every mask's runs — and written into a tiled GeoTIFF: H × 512 bytes
(uint8) at a time, 15 MB for a raster 30,000 pixels high, never an H × W plane. GDAL's COG
copy then reads that file block by block within its cache.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from segflow import palette, rle
from segflow.raster import RasterError
from segflow.vector import BATCH_ROWS, GEOREFERENCED, open_georeferenced

STRIP_COLUMNS = 512  # columns decoded and written at a time: one column of tiles
BLOCK = 512  # COG tile side


@dataclass(frozen=True)
class LabelFormat:
    """The label rasters' ``dtype`` (a numpy name) and ``nodata``, and ``classes``: the
    name of each class id the run knows, in id order (ids with no known name are
    ``class_<id>``)."""

    dtype: str
    nodata: int
    classes: tuple[str, ...]

    @classmethod
    def for_classes(cls, classes: Sequence[str]) -> LabelFormat:
        for dtype in ("uint8", "uint16"):
            nodata = int(np.iinfo(dtype).max)
            if len(classes) <= nodata:  # ids 0 .. nodata - 1
                return cls(dtype, nodata, tuple(classes))
        raise RasterError(
            f"{len(classes)} classes: a label raster holds at most 65535 (uint16, nodata 65535)"
        )


@dataclass(frozen=True)
class RasterExportSummary:
    rasters: int
    files: tuple[str, ...]
    format: LabelFormat


@dataclass(frozen=True)
class Grid:
    """A raster's grid: ``height`` × ``width`` pixels in ``crs`` through the affine
    ``transform`` (a, b, c, d, e, f)."""

    height: int
    width: int
    crs: str
    transform: tuple[float, ...]


def export_raster(run: str, out: str) -> RasterExportSummary:
    """Write a label COG per georeferenced raster of semantic run ``run`` into folder ``out``
    (see the module's docstring)."""
    import fsspec

    geo = open_georeferenced(run, "export-raster", semantic=True)
    fs, root = fsspec.core.url_to_fs(out)
    taken: set[str] = set()
    files = []
    try:
        label_format = LabelFormat.for_classes(_run_classes(geo.run, geo.db))
        fs.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="segflow-export-raster-") as tmp:
            for raster in _rasters(geo.db):
                name = _file_name(raster.uri, raster.image_id, taken)
                local = os.path.join(tmp, name)
                write_label_cog(local, raster.grid, raster.masks, label_format, what=raster.uri)
                fs.put_file(local, f"{root.rstrip('/')}/{name}")
                os.remove(local)
                files.append(f"{out.rstrip('/')}/{name}")
    finally:
        geo.db.close()
    return RasterExportSummary(len(files), tuple(files), label_format)


@dataclass(frozen=True)
class _Raster:
    image_id: int
    uri: str
    grid: Grid
    masks: list[tuple[int, str]]  # (class_id, RLE counts)


def _rasters(db: Any) -> Iterator[_Raster]:
    """The run's segmented georeferenced rasters with their masks, one at a time."""
    reader = db.sql(
        "SELECT g.image_id, i.uri, i.height, i.width, g.crs, g.transform, m.class_id, m.counts"
        f" FROM ({GEOREFERENCED}) g JOIN images i ON i.image_id = g.image_id"
        " LEFT JOIN masks m ON m.image_id = g.image_id"
        " WHERE i.status = 'ok' ORDER BY g.image_id, m.class_id"
    ).to_arrow_reader(BATCH_ROWS)
    rows = (row for batch in reader for row in batch.to_pylist())
    for image_id, group in itertools.groupby(rows, key=lambda row: row["image_id"]):
        first = next(group)
        grid = Grid(first["height"], first["width"], first["crs"], tuple(first["transform"]))
        masks = [
            (row["class_id"], row["counts"])
            for row in itertools.chain([first], group)
            if row["counts"] is not None  # a raster no mask covers: all nodata
        ]
        yield _Raster(image_id, first["uri"], grid, masks)


def _run_classes(run: Any, db: Any) -> list[str]:
    """The run's class names by id: the model's list where ``evaluation.json`` has it, else
    the names its masks carry, up to the largest id among them."""
    named = dict(db.sql("SELECT DISTINCT class_id, class_name FROM masks").fetchall())
    listed = list(run.evaluation["classes"]) if run.evaluation is not None else []
    count = max([len(listed), *(class_id + 1 for class_id in named)])
    return [listed[i] if i < len(listed) else named.get(i, f"class_{i}") for i in range(count)]


def _file_name(uri: str, image_id: int, taken: set[str]) -> str:
    stem = PurePosixPath(uri.rstrip("/")).stem or "raster"
    name = f"{stem}.tif" if f"{stem}.tif" not in taken else f"{stem}-{image_id}.tif"
    taken.add(name)
    return name


@dataclass(frozen=True)
class LabelRuns:
    """A raster's labelled runs in column-major pixel order, sorted and disjoint: run ``i``
    covers flat indexes ``starts[i]`` to ``ends[i]`` (exclusive) with ``values[i]``."""

    starts: np.ndarray
    ends: np.ndarray
    values: np.ndarray

    @classmethod
    def of_masks(
        cls, masks: Sequence[tuple[int, str]], grid: Grid, dtype: str, what: str
    ) -> LabelRuns:
        """The runs of ones of ``masks`` (``(class_id, counts)`` of COCO RLEs on ``grid``);
        a :class:`RasterError` naming ``what`` where two masks overlap."""
        starts, ends, values = [], [], []
        for class_id, counts in masks:
            lengths = rle.string_to_counts(counts, (grid.height, grid.width))
            bounds = np.cumsum(lengths, dtype=np.int64)
            # counts alternate zeros, ones, zeros...: ones run k spans bounds[2k]..bounds[2k+1]
            run_ends = bounds[1::2]
            run_starts = bounds[0::2][: len(run_ends)]
            kept = run_ends > run_starts
            starts.append(run_starts[kept])
            ends.append(run_ends[kept])
            values.append(np.full(int(kept.sum()), class_id, dtype))
        if not starts:
            empty = np.zeros(0, np.int64)
            return cls(empty, empty, np.zeros(0, dtype))
        start, end, value = np.concatenate(starts), np.concatenate(ends), np.concatenate(values)
        order = np.argsort(start, kind="stable")
        start, end, value = start[order], end[order], value[order]
        overlaps = np.flatnonzero(start[1:] < end[:-1])
        if overlaps.size:
            pixel = int(start[overlaps[0] + 1])
            raise RasterError(
                f"{what}: masks overlap (classes {value[overlaps[0]]} and "
                f"{value[overlaps[0] + 1]} at row {pixel % grid.height}, column "
                f"{pixel // grid.height}); a label raster needs one class per pixel"
            )
        return cls(start, end, value)

    def strip(self, low: int, high: int, nodata: int) -> np.ndarray:
        """Flat indexes ``low`` to ``high`` (whole columns) as labels, ``nodata`` between
        the runs."""
        first = np.searchsorted(self.ends, low, side="right")
        last = np.searchsorted(self.starts, high, side="left")
        starts = np.clip(self.starts[first:last], low, high) - low
        ends = np.clip(self.ends[first:last], low, high) - low
        # Alternating gaps (nodata) and runs, the last gap up to the strip's end.
        lengths = np.empty(2 * len(starts) + 1, np.int64)
        lengths[0:-1:2] = starts - np.concatenate([[0], ends[:-1]])
        lengths[1::2] = ends - starts
        lengths[-1] = (high - low) - (ends[-1] if len(ends) else 0)
        values = np.full(len(lengths), nodata, self.values.dtype)
        values[1::2] = self.values[first:last]
        return np.repeat(values, lengths)


def write_label_cog(
    path: str,
    grid: Grid,
    masks: Sequence[tuple[int, str]],
    label_format: LabelFormat,
    *,
    what: str,
) -> None:
    """Write the label COG of one raster's ``masks`` (``(class_id, counts)``) to local
    ``path``; ``what`` names the raster in errors."""
    import rasterio
    from affine import Affine
    from rasterio.shutil import copy
    from rasterio.windows import Window

    runs = LabelRuns.of_masks(masks, grid, label_format.dtype, what)
    profile = {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "count": 1,
        "dtype": label_format.dtype,
        "crs": grid.crs,
        "transform": Affine(*grid.transform),
        "nodata": label_format.nodata,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "zstd",  # a scratch file: fast to write and read back
        "BIGTIFF": "IF_SAFER",
    }
    scratch = f"{path}.strips.tif"
    with rasterio.open(scratch, "w", **profile) as dataset:
        for left in range(0, grid.width, STRIP_COLUMNS):
            right = min(left + STRIP_COLUMNS, grid.width)
            labels = runs.strip(left * grid.height, right * grid.height, label_format.nodata)
            window = Window(left, 0, right - left, grid.height)
            dataset.write(labels.reshape(right - left, grid.height).T, 1, window=window)
        colours = {i: (*palette.colour(i), 255) for i in range(len(label_format.classes))}
        dataset.write_colormap(1, colours | {label_format.nodata: (0, 0, 0, 0)})
        dataset.set_band_description(1, "class")
        dataset.update_tags(
            1, **{f"CLASS_{i}": name for i, name in enumerate(label_format.classes)}
        )
    copy(
        scratch,
        path,
        driver="COG",
        COMPRESS="DEFLATE",
        BLOCKSIZE=BLOCK,
        RESAMPLING="MODE",
        OVERVIEWS="AUTO",
        BIGTIFF="IF_SAFER",
    )
    os.remove(scratch)
