"""Georeferenced masks out as polygons: ``segflow export-vector RUN OUT``.

One row (feature) per polygon of a mask: a mask's 4-connected pieces of pixels, each with
its holes, traced along pixel edges in the raster's CRS (rasterio's ``features.shapes``
through the image's affine transform). So, without ``simplify``, rasterizing the polygons
back onto the raster's grid with pixel centres (GDAL's default) gives the RLE mask exactly,
and a polygon's area is its pixels × |a·e - b·d|. A mask is one RLE per raster, however
the tiled inference cut the raster into windows, so an object cut by window edges is one
polygon.

Columns: ``image_id``, ``uri``, ``class_id``, ``class_name``, ``score`` (null for semantic
masks), ``area`` (CRS units², of the polygon as written: after reprojection and
simplification), ``geometry``, and for GeoParquet ``bbox`` (a struct of ``xmin``, ``ymin``,
``xmax``, ``ymax``).

Formats: GeoParquet 1.1 (the ``geo`` file metadata: WKB encoding, the CRS as PROJJSON, the
``bbox`` column as the geometry's covering), or GeoJSON (a FeatureCollection, the CRS named
in the legacy ``crs`` member where it has an EPSG code, which GDAL reads; RFC 7946 readers
assume WGS 84, so pass ``--crs EPSG:4326`` for them).

Only images with a ``crs`` and ``transform`` (georeferenced rasters) are exported. All of
them must share one CRS unless ``crs`` reprojects every polygon to one. The run's masks are
read in batches and written as they come: the output never holds the run; one mask is
decoded at a time (H × W bytes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segflow import rle
from segflow.raster import RasterError, require_rasterio
from segflow.sql import sql_string

FORMATS = ("geoparquet", "geojson")
BATCH_ROWS = 256  # masks read per batch
GEOPARQUET_VERSION = "1.1.0"
# The images a GIS can place: those with a CRS and an affine transform.
GEOREFERENCED = "SELECT image_id, crs, transform FROM images WHERE crs IS NOT NULL"

_BBOX = pa.struct([(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("area", pa.float64(), nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
        pa.field("bbox", _BBOX, nullable=False),
    ]
)


@dataclass(frozen=True)
class VectorExport:
    """What ``export-vector`` writes: ``crs`` (None: the rasters' own), polygons simplified
    to ``simplify`` CRS units (0: exact pixel edges), smaller than ``min_area`` CRS units²
    dropped; only the masks of ``classes`` (names; empty: every class)."""

    crs: str | None = None
    simplify: float = 0.0
    min_area: float = 0.0
    format: str = "geoparquet"
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise RasterError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.simplify < 0 or self.min_area < 0:
            raise RasterError("--simplify and --min-area must not be negative")


@dataclass(frozen=True)
class GeoreferencedRun:
    """A run with georeferenced rasters: ``run`` (:func:`segflow.evaluation.open_run`),
    ``db`` (its tables, :meth:`segflow.evaluation.Run.connect`) and ``crs``, the distinct
    CRSs of its rasters, sorted."""

    run: Any
    db: Any
    crs: tuple[str, ...]


def open_georeferenced(location: str, what: str, *, semantic: bool = False) -> GeoreferencedRun:
    """The run at ``location`` for command ``what``; a :class:`RasterError` naming it where
    rasterio is missing, no image of the run has a ``crs``, or, with ``semantic``, the run
    is not a semantic model's (its ``evaluation.json`` says so, or its masks are
    detections)."""
    require_rasterio(what)
    from segflow.evaluation import open_run

    run = open_run(location)
    db = run.connect()
    try:
        if semantic:
            task = (run.evaluation or {}).get("task", "semantic")
            [(detections,)] = db.sql(
                "SELECT count(*) FROM masks WHERE instance IS NOT NULL"
            ).fetchall()
            if task != "semantic" or detections:
                raise RasterError(
                    f"{location}: a run of an instance model ({detections} detections, which "
                    f"may overlap); {what} needs a semantic run (one class per pixel)"
                )
        crs = db.sql(f"SELECT DISTINCT crs FROM ({GEOREFERENCED}) ORDER BY 1").fetchall()
        if not crs:
            raise RasterError(
                f"{location}: no georeferenced raster in the run (no image has a crs)"
            )
    except BaseException:
        db.close()
        raise
    return GeoreferencedRun(run, db, tuple(value for (value,) in crs))


@dataclass(frozen=True)
class ExportSummary:
    images: int
    masks: int
    polygons: int
    crs: str


def export_vector(run: str, out: str, options: VectorExport) -> ExportSummary:
    """Write the polygons of run ``run`` (see :func:`segflow.evaluation.open_run`) to ``out``."""
    import fsspec
    from pyproj import CRS

    geo = open_georeferenced(run, "export-vector")
    db, crs_values = geo.db, geo.crs
    if options.crs is None and len(crs_values) > 1:
        raise RasterError(
            f"{run}: its rasters are in {len(crs_values)} CRSs ({', '.join(crs_values[:3])}"
            "...); pass --crs EPSG:n to reproject them to one"
        )
    target = options.crs or crs_values[0]
    try:
        target_crs = CRS.from_user_input(target)
    except Exception as error:
        raise RasterError(f"--crs {target!r} is not a CRS pyproj knows: {error}") from error
    reprojectors = _Reprojectors(target_crs)
    # Each mask with its raster's grid, streamed in batches: nothing per image is held here.
    [(images,)] = db.sql(
        f"SELECT count(*) FROM ({GEOREFERENCED}) SEMI JOIN masks USING (image_id)"
    ).fetchall()
    where = ""
    if options.classes:
        named = {name for (name,) in db.sql("SELECT DISTINCT class_name FROM masks").fetchall()}
        unknown = [name for name in options.classes if name not in named]
        if unknown:
            raise RasterError(
                f"--classes {','.join(unknown)}: no mask of {run} has that class (its "
                f"classes: {', '.join(sorted(named))})"
            )
        where = f" WHERE class_name IN ({', '.join(map(sql_string, options.classes))})"
    masks = db.sql(
        "SELECT image_id, uri, class_id, class_name, score, counts, height, width, crs, "
        f"transform FROM masks JOIN ({GEOREFERENCED}) USING (image_id){where}"
    ).to_arrow_reader(BATCH_ROWS)
    counted = {"masks": 0, "polygons": 0}

    def features() -> Iterator[dict[str, Any]]:
        for batch in masks:
            for row in batch.to_pylist():
                counted["masks"] += 1
                grid = (row["crs"], tuple(row["transform"]))
                for feature in _polygons(row, grid, reprojectors, options):
                    counted["polygons"] += 1
                    yield feature

    with fsspec.open(out, "wb") as f:
        if options.format == "geoparquet":
            _write_geoparquet(f, features(), target_crs)
        else:
            _write_geojson(f, features(), target_crs)
    db.close()
    return ExportSummary(images, counted["masks"], counted["polygons"], _crs_name(target_crs))


def _crs_name(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.name


class _Reprojectors:
    """Transformers from each raster CRS to the target, built once each."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self._cache: dict[str, Any] = {}

    def __call__(self, crs: str) -> Any:
        if crs not in self._cache:
            from pyproj import CRS, Transformer

            source = CRS.from_user_input(crs)
            self._cache[crs] = (
                None
                if source == self.target
                else Transformer.from_crs(source, self.target, always_xy=True).transform
            )
        return self._cache[crs]


def mask_polygons(mask: np.ndarray, transform: tuple[float, ...]) -> list[Any]:
    """The shapely polygons of a binary mask (H, W): its 4-connected pieces along pixel
    edges, in the coordinates of the affine ``transform`` (a, b, c, d, e, f)."""
    from affine import Affine
    from rasterio import features
    from shapely.geometry import shape

    grid = Affine(*transform)
    return [
        shape(geometry)
        for geometry, _ in features.shapes(mask, mask=mask.astype(bool), transform=grid)
    ]


def _polygons(
    row: dict[str, Any],
    grid: tuple[str, tuple[float, ...]],
    reprojectors: _Reprojectors,
    options: VectorExport,
) -> Iterator[dict[str, Any]]:
    import shapely

    crs, transform = grid
    mask = rle.decode({"size": [row["height"], row["width"]], "counts": row["counts"]})
    to_target = reprojectors(crs)
    for polygon in mask_polygons(mask, transform):
        if to_target is not None:
            polygon = shapely.transform(polygon, to_target, interleaved=False)
        if options.simplify:
            polygon = polygon.simplify(options.simplify, preserve_topology=True)
        if polygon.is_empty or polygon.area < options.min_area:
            continue
        yield {
            "image_id": row["image_id"],
            "uri": row["uri"],
            "class_id": row["class_id"],
            "class_name": row["class_name"],
            "score": row["score"],
            "area": polygon.area,
            "geometry": polygon,
        }


def _write_geoparquet(f: Any, features: Iterator[dict[str, Any]], crs: Any) -> None:
    geo = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": crs.to_json_dict(),
                "covering": {
                    "bbox": {
                        "xmin": ["bbox", "xmin"],
                        "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"],
                        "ymax": ["bbox", "ymax"],
                    }
                },
            }
        },
    }
    schema = SCHEMA.with_metadata({"geo": json.dumps(geo)})
    with pq.ParquetWriter(f, schema, compression="zstd") as writer:
        batch: list[dict[str, Any]] = []
        for feature in features:
            geometry = feature["geometry"]
            xmin, ymin, xmax, ymax = geometry.bounds
            batch.append(
                feature
                | {
                    "geometry": geometry.wkb,
                    "bbox": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
                }
            )
            if len(batch) == BATCH_ROWS * 16:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _write_geojson(f: Any, features: Iterator[dict[str, Any]], crs: Any) -> None:
    from shapely.geometry import mapping

    head: dict[str, Any] = {"type": "FeatureCollection"}
    epsg = crs.to_epsg()
    if epsg is not None:
        head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    f.write(json.dumps(head)[:-1].encode() + b', "features": [\n')
    for index, feature in enumerate(features):
        properties = {key: value for key, value in feature.items() if key != "geometry"}
        record = {
            "type": "Feature",
            "properties": properties,
            "geometry": mapping(feature["geometry"]),
        }
        f.write((",\n" if index else "").encode() + json.dumps(record).encode())
    f.write(b"\n]}\n")
