"""The demo: the product's main job, end to end, on an embedded default.

On a laptop with nothing else running: an S3 endpoint on loopback (moto's server), a local
Ray and Prefect's ephemeral server. The demo writes the synthetic aerial corpus's held-out
split into a bucket, runs the ``segment`` flow with the project's demo models (a U-Net for
semantic segmentation, an instance model for buildings and cars) reading from and writing to
``s3://`` as production does, runs the ``evaluate`` flow on both runs, copies the runs to a
local folder (the endpoint's storage goes away with it), writes an HTML report per run and
prints the figures and a few DuckDB queries. With ``real``, it also segments and evaluates
the CamVid frames of ``../shared`` with the ESPNet model, whose card states its figures.

Last, a GeoTIFF run: the first held-out scenes are also written as georeferenced GeoTIFF
tiles (a mosaic over Dubai in UTM zone 40N, with nodata margins at its edges; see
:mod:`segflow.demo.corpus`), which the U-Net segments through :mod:`segflow.raster`; its
buildings and roads are exported as GeoParquet polygons (:mod:`segflow.vector`) and its
labels as COGs (:mod:`segflow.label_raster`), and the demo prints how to open them. It has
no ground truth: evaluating GeoTIFF inputs is not supported yet, so the evaluated semantic
run reads the JPEG scenes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import fsspec
from rich.console import Console
from rich.table import Table

from pipelines.evaluate import evaluate
from pipelines.segment import segment_job
from segflow import analytics
from segflow.demo.corpus import Split, write_corpus
from segflow.job import Job
from segflow.label_raster import export_raster
from segflow.metrics.figures import figures_in, format_figure
from segflow.progress import segment_progress
from segflow.report import render_report
from segflow.vector import VectorExport, export_vector

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / "models" / "demo"
BUCKET = "s3://segflow-demo"
GEO_TILES = 6  # held-out scenes also written as GeoTIFF tiles: a mosaic of 3 x 2
GEO_CLASSES = ("building", "road")  # what the GeoTIFF run exports as polygons

QUERIES = {
    "semantic": [
        (
            "Pixels per class over the run",
            "SELECT class_name, sum(area) AS pixels, count(DISTINCT image_id) AS images "
            "FROM masks GROUP BY class_name ORDER BY pixels DESC",
        ),
        (
            "The three worst images by their own mIoU",
            "SELECT regexp_extract(uri, '[^/]+$') AS image, round(miou, 3) AS miou, "
            "round(boundary_iou, 3) AS boundary_iou FROM images WHERE miou IS NOT NULL "
            "ORDER BY miou LIMIT 3",
        ),
    ],
    "instance": [
        (
            "Images with the most detections scored 0.5 or more",
            "SELECT regexp_extract(uri, '[^/]+$') AS image, count(*) AS detections, "
            "count(*) FILTER (class_name = 'car') AS cars FROM masks WHERE score >= 0.5 "
            "GROUP BY uri ORDER BY detections DESC LIMIT 3",
        ),
        (
            "Errors by stage",
            "SELECT stage, error_type, count(*) AS images FROM errors GROUP BY ALL ORDER BY 3 DESC",
        ),
    ],
}


@dataclass(frozen=True)
class DemoRun:
    name: str
    model: Path | str
    gt: str
    ignore_index: int | None = None


def demo_runs(corpus_root: str) -> list[DemoRun]:
    return [
        DemoRun("semantic", DEMO_MODELS / "aerial_unet.pt2", f"masks:{corpus_root}/labels"),
        DemoRun(
            "instance",
            DEMO_MODELS / "aerial_instances.pt2",
            f"coco:{corpus_root}/instances.json",
        ),
    ]


def run_demo(
    out: Path,
    *,
    images: int,
    large: int,
    broken: int,
    shard_size: int,
    console: Console,
    shared: Path | None = None,
) -> dict[str, Any]:
    """Everything above; the S3 endpoint must already be in the environment (``local_s3``).
    Returns each run's evaluation, by run name."""
    console.rule("1. the corpus")
    split = write_corpus(
        f"{BUCKET}/corpus",
        split="heldout",
        images=images,
        large=large,
        broken=broken,
        geotiff=min(GEO_TILES, images),
    )
    console.print(
        f"{split.num_images} images ({large} larger than the tiling threshold) and "
        f"{split.num_broken} broken files in {split.images}; "
        f"{min(GEO_TILES, images)} GeoTIFF tiles in {split.geotiff}"
    )
    plans = [(run, split.images) for run in demo_runs(split.root)]
    if shared is not None:
        camvid = shared / "data" / "camvid_val"
        plans.append(
            (
                DemoRun(
                    "camvid",
                    shared / "models" / "espnet_camvid.pt2",
                    f"masks:{camvid / 'labels'}",
                    ignore_index=11,
                ),
                str(camvid / "images"),
            )
        )
    results = {}
    for step, (run, source) in enumerate(plans, start=2):
        console.rule(f"{step}. segment: {run.name} ({Path(run.model).name})")
        with segment_progress(console, run.name) as hooks:
            job = Job(
                input=source,
                model=str(run.model),
                out=f"{BUCKET}/runs/{run.name}",
                gt=run.gt,
                ignore_index=run.ignore_index,
                shard_size=shard_size,
            )
            summary = segment_job(job, **hooks)
        console.print(
            f"{summary['images'] - summary['failed']} images segmented, {summary['failed']} "
            f"failed (see the errors table), {summary['masks']} masks, "
            f"{summary['images_per_second']:.1f} img/s"
        )
        results[run.name] = evaluate(run=summary["output"])
        local = out / "runs" / run.name / f"run={summary['run_id']}"
        _copy_run(summary["output"], local)
        report = out / f"report-{run.name}.html"
        report.write_text(render_report(str(local)), encoding="utf-8")
        results[run.name]["local"] = str(local)
        results[run.name]["report"] = str(report)
    console.rule(f"{len(plans) + 2}. results")
    for name, result in results.items():
        _print_figures(console, name, result)
        with analytics.connect(result["local"]) as db:
            for title, sql in QUERIES["instance" if "instance" in result else "semantic"]:
                _print_query(console, db, title, sql)
        console.print(f"run: {result['local']}   report: {result['report']}\n")
    console.rule(f"{len(plans) + 3}. a GeoTIFF run: polygons and label rasters")
    _geotiff_run(out, split, shard_size, console)
    return results


def _geotiff_run(out: Path, split: Split, shard_size: int, console: Console) -> None:
    with segment_progress(console, "geotiff") as hooks:
        job = Job(
            input=str(split.geotiff),
            model=str(DEMO_MODELS / "aerial_unet.pt2"),
            out=f"{BUCKET}/runs/geotiff",
            shard_size=shard_size,
        )
        summary = segment_job(job, **hooks)
    local = out / "runs" / "geotiff" / f"run={summary['run_id']}"
    _copy_run(summary["output"], local)
    polygons = out / "geotiff" / "buildings-roads.parquet"
    polygons.parent.mkdir(parents=True, exist_ok=True)
    vectors = export_vector(str(local), str(polygons), VectorExport(classes=GEO_CLASSES))
    labels = export_raster(str(local), str(out / "geotiff" / "labels"))
    console.print(
        f"{summary['images'] - summary['failed']} GeoTIFF tiles segmented ({vectors.crs}): "
        f"{vectors.polygons} polygons of {' and '.join(GEO_CLASSES)} in {polygons}, "
        f"{labels.rasters} label COGs in {out / 'geotiff' / 'labels'}"
    )
    sql = (
        "SELECT class_name, count(*) AS polygons, round(sum(area)) AS m2, "
        f"round(max(area), 1) AS largest_m2 FROM '{polygons}' GROUP BY class_name ORDER BY m2 DESC"
    )
    with duckdb.connect() as db:
        _print_query(console, db, "The GeoParquet in DuckDB", sql)
    console.print(
        "Open the polygons in GeoPandas (docs/geotiff.md):\n"
        f"    import geopandas\n    frame = geopandas.read_parquet({str(polygons)!r})\n"
        "    frame.groupby('class_name').area.sum()   # m², EPSG:32640\n"
        f"and the label COGs in QGIS or rasterio: {labels.files[0]}\n"
        f"run: {local}\n"
    )


def _copy_run(uri: str, local: Path) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    if local.exists():
        shutil.rmtree(local)
    fs.get(root.rstrip("/") + "/", str(local), recursive=True)


def _print_figures(console: Console, name: str, result: dict[str, Any]) -> None:
    table = Table(title=f"{name}: {result['images']['evaluated']} images evaluated")
    table.add_column("figure")
    table.add_column("value", justify="right")
    if "semantic" in result:
        semantic = result["semantic"]
        for figure in figures_in(semantic):
            table.add_row(figure.name, figure.format(semantic[figure.name], 4))
        for class_name, iou in zip(semantic["classes"], semantic["per_class_iou"], strict=True):
            table.add_row(f"  IoU {class_name}", _formatted(iou))
    for iou_type, scores in result.get("instance", {}).items():
        for figure, value in zip(scores["stat_names"][:3], scores["stats"][:3], strict=True):
            table.add_row(f"{iou_type} {figure}", _formatted(value))
    console.print(table)


def _print_query(console: Console, db: duckdb.DuckDBPyConnection, title: str, sql: str) -> None:
    relation = db.sql(sql)
    columns, rows = relation.columns, relation.fetchall()
    table = Table(title=title, caption=sql, caption_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(value) for value in row))
    console.print(table)


def _formatted(value: float | None) -> str:
    return format_figure(value, 4)


def shared_folder() -> Path | None:
    """``../shared`` (or ``SEGFLOW_SHARED``) when it is there."""
    root = Path(os.environ.get("SEGFLOW_SHARED", REPO.parent / "shared"))
    return root if (root / "models" / "espnet_camvid.pt2").is_file() else None
