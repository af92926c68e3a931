"""Georeferenced rasters in: GeoTIFF and Cloud-Optimized GeoTIFF inputs, read window by window.

A ``.tif``/``.tiff`` input that carries georeferencing (a CRS or a geotransform) is opened
with rasterio (the optional ``geo`` extra: ``pip install 'segflow[geo]'``); a plain TIFF
keeps the picture decoder of :mod:`segflow.decode`. Local paths are opened by GDAL;
``s3://`` and other fsspec URIs through fsspec file objects, so GDAL reads byte ranges (a
COG's header, then the tiles a window needs), never the whole object.

Windows, not images. A raster is never decoded whole: the tiled inference
(:func:`segflow.tiling.blended_column_blocks`) asks for one ``tile x tile`` window at a time
and this module reads exactly that window's pixels. Windows whose pixels are all invalid
are not read and not run through the model. Blended logits come back in finished blocks, a
band of columns at a time; a band's labels (one byte a pixel up to 255 classes) are run-
length encoded as soon as the band is done, in COCO's column-major order, by
:class:`segflow.rle.LabelMapEncoder`, which keeps only each class's counts string so far.

Memory. With ``C`` classes, ``tile`` and ``overlap`` (stride ``S = tile - overlap``, ``B =
tile + S``) and a raster ``H`` pixels high, a run holds beyond the loaded model and its pass
over one window (:func:`memory_bound`, in bytes)::

    16 (C + 1) B²           the band's unfinished rows, float32 sums and weights, and the
                            window's weighted logits
    + 8 (C + 1) overlap H   the sums of the columns a band shares with the next, for the
                            band before and the band being blended
    + 2 B H                 the band's labels (two bytes a pixel above 255 classes)
    + 100 ENCODE_PIXELS     encoding a piece of labels, were every pixel a run
    + BLOCK_CACHE_BYTES     GDAL's cache of decoded file tiles (64 MiB; GDAL_CACHEMAX sets it)
    + 5 R                   the RLEs' counts strings (R bytes): as encoded, as the rows'
                            bytes and in the rows' Arrow table, with the copies between

It grows with the height only, through the shared columns and the band's labels (C = 11,
tile 512, overlap 64: 8 KiB a row, 235 MiB at 30000 rows, plus 258 MiB whatever the size),
and with the area only through the masks themselves.

Bands: the model takes 3 channels (RGB). ``bands`` (1-based) picks which raster bands feed
them, from ``--bands`` (:class:`RasterOptions`), else the model card's ``input.bands``, else
``1,2,3``; a single-band scene feeds an RGB model with ``1,1,1``. A band the raster does not
have is that image's error; a band list that is not 3 long is refused before any work.

Values: 8-bit bands are passed as they are. Any other type needs a rescale to 0..255,
``--rescale LOW,HIGH``: values (``0,3000``) or per-image percentiles of the valid pixels
(``p2,p98``), taken from a read of at most :data:`PERCENTILE_SIDE` pixels a side (GDAL
takes it from the overviews when the file has them). Values outside clip.

Nodata: GDAL's dataset mask (nodata values, an alpha band, a ``.msk`` file; rasterio's
``dataset_mask``) marks the valid pixels. Invalid pixels get no class: no mask covers them,
so they count in no area and no metric.

Georeferencing: :class:`Georeference` is what the ``images`` table records, the CRS as
``EPSG:n`` where it has a code and WKT2 otherwise, and the affine transform ``(a, b, c, d,
e, f)`` of rasterio (x = a·col + b·row + c, y = d·col + e·row + f, at pixel corners).
"""

from __future__ import annotations

import contextvars
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segflow import rle
from segflow.errors import SegflowError

INSTALL_HINT = "pip install 'segflow[geo]'"
MODEL_CHANNELS = 3  # every model takes RGB
DEFAULT_BANDS = (1, 2, 3)
PERCENTILE_SIDE = 1024
RASTER_SUFFIXES = (".tif", ".tiff")
# GDAL's block cache (decoded tiles), unless the environment sets GDAL_CACHEMAX: GDAL's own
# default is 5% of the machine's memory, which a large raster fills.
BLOCK_CACHE_BYTES = 64 << 20
ENCODE_PIXELS = 1 << 18  # labels run-length encoded at a time


class RasterError(SegflowError, ValueError):
    """A raster, or a raster option, that cannot be used; the message names it."""


def require_rasterio(what: str) -> Any:
    """The rasterio module, or a :class:`RasterError` saying ``what`` needs it and how to
    install it."""
    try:
        import rasterio
    except ImportError as error:
        raise RasterError(
            f"{what} needs rasterio, which is not installed: {INSTALL_HINT}"
        ) from error
    return rasterio


def rasterio_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


# TIFF tags that make a TIFF a GeoTIFF: ModelPixelScale, ModelTiepoint, ModelTransformation,
# GeoKeyDirectory.
_GEOTIFF_TAGS = frozenset({33550, 33922, 34264, 34735})


def refuse_geotiff_without_rasterio(data: bytes, uri: str) -> None:
    """Without rasterio a GeoTIFF would be decoded as a picture, its georeferencing and
    nodata lost: refuse it, with the install hint. A plain TIFF passes."""
    import io

    from PIL import Image

    try:
        tags = set(Image.open(io.BytesIO(data)).tag_v2)
    except Exception:
        return  # not a readable TIFF: the decoder names the problem
    if tags & _GEOTIFF_TAGS:
        raise RasterError(
            f"{uri}: a GeoTIFF (georeferenced) needs rasterio, which is not installed: "
            f"{INSTALL_HINT}"
        )


def is_raster_uri(uri: str) -> bool:
    """Whether ``uri`` names a TIFF, the one format that may carry georeferencing."""
    return uri.split("?", 1)[0].lower().endswith(RASTER_SUFFIXES)


@dataclass(frozen=True)
class Rescale:
    """Maps ``low`` to 0 and ``high`` to 255; with ``percentiles``, both are percentiles of
    each image's valid pixels."""

    low: float
    high: float
    percentiles: bool = False

    @classmethod
    def parse(cls, text: str) -> Rescale:
        """``LOW,HIGH`` values or ``pLOW,pHIGH`` percentiles, e.g. ``0,3000`` or ``p2,p98``."""
        parts = [part.strip() for part in text.split(",")]
        problem = f"--rescale {text!r}: expected LOW,HIGH (e.g. 0,3000) or percentiles (p2,p98)"
        if len(parts) != 2:
            raise RasterError(problem)
        marked = [part.lower().startswith("p") for part in parts]
        if marked[0] != marked[1]:
            raise RasterError(f"{problem}; both or neither must be percentiles")
        try:
            low, high = (float(part[1:] if marked[0] else part) for part in parts)
        except ValueError:
            raise RasterError(problem) from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise RasterError(f"{problem}; LOW must be below HIGH")
        if marked[0] and not 0 <= low < high <= 100:
            raise RasterError(f"{problem}; percentiles are from 0 to 100")
        return cls(low, high, marked[0])

    def __str__(self) -> str:
        mark = "p" if self.percentiles else ""
        return f"{mark}{self.low:g},{mark}{self.high:g}"


def parse_bands(text: str) -> tuple[int, ...]:
    """``--bands 1,2,3``: 1-based raster bands, one per model channel."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise RasterError(f"--bands {text!r}: expected 1-based band numbers, e.g. 1,2,3") from None
    return checked_bands(bands, f"--bands {text}")


def checked_bands(bands: tuple[int, ...], where: str) -> tuple[int, ...]:
    if any(band < 1 for band in bands):
        raise RasterError(f"{where}: band numbers start at 1")
    if len(bands) != MODEL_CHANNELS:
        raise RasterError(
            f"{where}: {len(bands)} band(s) cannot feed the model's {MODEL_CHANNELS} channels "
            "(RGB); a single-band scene is --bands 1,1,1"
        )
    return bands


@dataclass(frozen=True)
class RasterOptions:
    """How rasters feed the model: ``bands`` (None: the card's, else 1,2,3) and ``rescale``
    (None: only 8-bit rasters are accepted)."""

    bands: tuple[int, ...] | None = None
    rescale: Rescale | None = None

    def as_config(self) -> dict[str, Any]:
        """What a run records of them (a resume must match)."""
        return {
            "bands": None if self.bands is None else list(self.bands),
            "rescale": None if self.rescale is None else str(self.rescale),
        }


@dataclass(frozen=True)
class Georeference:
    crs: str | None  # EPSG:n, or WKT2 where the CRS has no code
    transform: tuple[float, float, float, float, float, float] | None

    @property
    def pixel_area(self) -> float | None:
        """The area of one pixel in CRS units²."""
        if self.transform is None:
            return None
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)


def crs_text(crs: Any) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt(version="WKT2_2019")


class RasterSource:
    """An open georeferenced raster: its grid, the model's view of its windows, its validity.

    Windows are ``(top, bottom, left, right)`` in pixels."""

    def __init__(self, uri: str, dataset: Any, options: RasterOptions, card_bands):
        self.uri = uri
        self.dataset = dataset
        # rasterio keeps an fsspec-opened dataset's file objects in context variables of the
        # thread that opened it; the shard reads its windows and closes it in another.
        self._context = contextvars.copy_context()
        self.height, self.width = int(dataset.height), int(dataset.width)
        transform = dataset.transform
        self.georeference = Georeference(
            crs_text(dataset.crs),
            None if transform.is_identity and dataset.crs is None else tuple(transform)[:6],
        )
        self.bands = options.bands or card_bands or DEFAULT_BANDS
        if max(self.bands) > dataset.count:
            raise RasterError(
                f"{uri}: has {dataset.count} band(s), bands {','.join(map(str, self.bands))} "
                "were asked for (--bands, or the model card's input.bands)"
                + ("; a single-band scene is --bands 1,1,1" if dataset.count == 1 else "")
            )
        self._scale = self._value_scale(options.rescale)

    def _value_scale(self, rescale: Rescale | None) -> tuple[float, float] | None:
        dtypes = {self.dataset.dtypes[band - 1] for band in self.bands}
        if rescale is None:
            if dtypes != {"uint8"}:
                raise RasterError(
                    f"{self.uri}: bands of type {', '.join(sorted(dtypes))} need a rescale to "
                    "8 bits: --rescale LOW,HIGH (values) or --rescale p2,p98 (percentiles)"
                )
            return None
        if not rescale.percentiles:
            return rescale.low, rescale.high
        sample, valid = self._overview()
        values = sample[:, valid]
        if values.size == 0:
            return 0.0, 1.0  # no valid pixel: every window is skipped anyway
        low, high = np.percentile(values, [rescale.low, rescale.high])
        return float(low), float(max(high, low + 1e-9))

    def _overview(self) -> tuple[np.ndarray, np.ndarray]:
        scale = max(1.0, max(self.height, self.width) / PERCENTILE_SIDE)
        shape = (max(1, round(self.height / scale)), max(1, round(self.width / scale)))
        sample = self.dataset.read(list(self.bands), out_shape=(len(self.bands), *shape))
        valid = self.dataset.dataset_mask(out_shape=shape) > 0
        return sample, valid

    def _window(self, window: tuple[int, int, int, int]) -> Any:
        from rasterio.windows import Window

        top, bottom, left, right = window
        return Window(left, top, right - left, bottom - top)

    def valid(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The window's valid pixels, (h, w) bool."""
        return self._context.run(self.dataset.dataset_mask, window=self._window(window)) > 0

    def pixels(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The window as the model's RGB input, (h, w, 3) uint8."""
        values = self._context.run(self.dataset.read, list(self.bands), window=self._window(window))
        if self._scale is not None:
            low, high = self._scale
            values = np.clip((values.astype(np.float32) - low) * (255 / (high - low)), 0, 255)
            values = np.rint(values)
        return np.ascontiguousarray(values.transpose(1, 2, 0), dtype=np.uint8)

    def model_window(self, window: tuple[int, int, int, int]) -> torch.Tensor | None:
        """The window as a (1, 3, h, w) uint8 batch, or None when none of it is valid."""
        if not self.valid(window).any():
            return None
        return torch.from_numpy(self.pixels(window)).permute(2, 0, 1)[None]

    def close(self) -> None:
        self._context.run(self.dataset.close)


def open_raster(
    uri: str, options: RasterOptions, card_bands: tuple[int, ...] | None = None
) -> RasterSource | None:
    """The raster at ``uri``, or None when it carries no georeferencing (a plain TIFF: the
    picture decoder reads it)."""
    rasterio = require_rasterio(f"{uri}: reading GeoTIFF inputs")
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from rasterio.env import set_gdal_config
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if "GDAL_CACHEMAX" not in os.environ:
        set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if isinstance(fs, LocalFileSystem):
                if not os.path.isfile(path):
                    raise OSError(f"not a regular file: {path}")
                dataset = rasterio.open(path)
            else:
                # Through the opener GDAL reads byte ranges of the object (and finds its .msk
                # beside it); a file object would be read into memory whole.
                dataset = rasterio.open(path, opener=fs)
    except RasterioIOError as error:
        raise RasterError(f"{uri}: not a readable TIFF ({error})") from error
    if dataset.crs is None and dataset.transform.is_identity and not dataset.gcps[0]:
        dataset.close()
        return None
    try:
        return RasterSource(uri, dataset, options, card_bands)
    except BaseException:
        dataset.close()
        raise


def memory_bound(height: int, classes: int, tile: int, overlap: int, counts_bytes: int = 0) -> int:
    """Bytes :func:`segment_raster` holds for a raster ``height`` pixels high beyond the
    loaded model and its pass over one window (the module docstring's formula);
    ``counts_bytes`` is the size of the RLEs' counts strings."""
    span = 2 * tile - overlap
    floats = 4 * (classes + 1) * span * span + 2 * (classes + 1) * overlap * height
    return (
        4 * floats + 2 * span * height + 100 * ENCODE_PIXELS + BLOCK_CACHE_BYTES + 5 * counts_bytes
    )


def segment_raster(
    model: Any, source: RasterSource, on_band: Callable[[], None] | None = None
) -> tuple[np.ndarray, rle.Measured]:
    """The class ids a semantic ``model`` finds in the raster and their RLEs (with areas and
    boxes), window by window; invalid pixels are in no mask. ``on_band`` is called after
    each band of columns."""
    if model.task != "semantic":
        raise RasterError(
            f"{source.uri}: GeoTIFF inputs take semantic models for now; {model.name} is an "
            "instance model"
        )
    height, width = source.height, source.width
    no_class = len(model.classes)
    encoder = rle.LabelMapEncoder(height, width, ignore_index=no_class)
    columns_per_piece = max(1, ENCODE_PIXELS // height)
    band = np.empty((0, height), np.min_scalar_type(no_class))  # (columns, rows)
    for (top, bottom, left, right), labels in model.label_blocks(
        source.model_window, height, width
    ):
        if top == 0:
            band = np.full((right - left, height), no_class, band.dtype)
        if labels is not None:
            valid = source.valid((top, bottom, left, right))
            band[:, top:bottom] = np.where(valid, labels.numpy(), no_class).T
        if bottom == height:
            for first in range(0, len(band), columns_per_piece):
                encoder.add(band[first : first + columns_per_piece])
            if on_band is not None:
                on_band()
    return encoder.finish()
