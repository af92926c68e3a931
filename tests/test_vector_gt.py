"""Vector ground truth (``vector:FILE?class=..``) on the shared rasters and their polygons, and
the evaluation of GeoTIFF runs: each figure checked against pixel centres tested one by one
with shapely, pycocotools, and the masks a run wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
geopandas = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

from pycocotools import mask as coco_mask  # noqa: E402

from segflow import raster  # noqa: E402
from segflow.groundtruth import (  # noqa: E402
    IGNORE,
    UNLABELLED,
    GroundTruthError,
    InstanceTarget,
    ModelClasses,
    RasterGrid,
    SemanticTarget,
    open_ground_truth,
    within_valid,
)
from segflow.prediction import SemanticPrediction  # noqa: E402
from segflow.scoring import SemanticScorer, scorer_for  # noqa: E402
from tests.conftest import shared_root  # noqa: E402
from tests.test_evaluation import SEGFLOW, segflow  # noqa: E402

SAMPLE_BUILDING_PIXELS = 33_818  # the figure for sample_geotiff.tif
CAMVID = ModelClasses(
    "semantic",
    (
        "sky",
        "building",
        "pole",
        "road",
        "pavement",
        "tree",
        "sign_symbol",
        "fence",
        "car",
        "pedestrian",
        "bicyclist",
    ),
)
BUILDING = CAMVID.classes.index("building")


@pytest.fixture(scope="module")
def geotiff(shared: Path) -> Path:
    return shared / "data" / "geotiff"


@pytest.fixture(scope="module")
def labels(geotiff: Path) -> Path:
    return geotiff / "geotiff_labels.geojson"


def grid_of(path: Path, valid: bool = True) -> RasterGrid:
    with rasterio.open(path) as dataset:
        return RasterGrid(
            dataset.height,
            dataset.width,
            raster.crs_text(dataset.crs),
            tuple(dataset.transform)[:6],
            dataset.dataset_mask() > 0 if valid else None,
        )


def centres_inside(path: Path, polygons_file: Path) -> np.ndarray:
    """(H, W) bool: the pixel centres that lie inside a polygon, tested one by one with
    shapely (the polygons read with json, in the raster's CRS)."""
    with rasterio.open(path) as dataset:
        height, width, transform = dataset.height, dataset.width, dataset.transform
    features = json.loads(polygons_file.read_text())["features"]
    union = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in features])
    rows, columns = np.mgrid[0:height, 0:width]
    xs, ys = transform @ (columns + 0.5, rows + 0.5)
    return shapely.contains_xy(union, xs, ys)


def vector(path: Path, options: str = "class=building", model=CAMVID):
    return open_ground_truth(f"vector:{path}?{options}", model=model)


# --------------------------------------------------------------------------------------------
# Rasterizing.


def test_sample_geotiff_has_the_buildings_pixel_centres(geotiff, labels):
    target = vector(labels).target("sample_geotiff.tif", grid_of(geotiff / "sample_geotiff.tif"))
    assert isinstance(target, SemanticTarget)
    assert int((target.labels == BUILDING).sum()) == SAMPLE_BUILDING_PIXELS
    inside = centres_inside(geotiff / "sample_geotiff.tif", labels)
    assert np.array_equal(target.labels == BUILDING, inside)
    # CamVid has no background class: the rest is unlabelled, and only building is evaluated.
    assert set(np.unique(target.labels).tolist()) == {UNLABELLED, BUILDING}
    assert target.classes == frozenset({BUILDING})
    assert target.source == str(labels)


def test_labels_in_another_crs_are_reprojected_onto_the_raster(geotiff, labels, tmp_path):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    native = vector(labels).target("a.tif", grid).labels
    lon_lat = tmp_path / "labels_4326.geojson"
    geopandas.read_file(labels).to_crs("EPSG:4326").to_file(lon_lat, driver="GeoJSON")
    assert '"coordinates": [ [ [ -84.' in lon_lat.read_text()  # really longitude, latitude
    reprojected = vector(lon_lat).target("a.tif", grid).labels
    # Only the vertices travel (UTM -> lon/lat at GeoJSON's 15 digits -> UTM: nanometres), so
    # only a pixel centre lying on an edge could change sides. Measured: none of 810,000; a
    # handful would still be a reprojection, a wrong one moves thousands.
    assert int((reprojected != native).sum()) <= 10
    assert abs(int((reprojected == BUILDING).sum()) - SAMPLE_BUILDING_PIXELS) <= 10


def test_a_file_that_names_no_crs_is_taken_in_the_rasters(geotiff):
    # GeoJSON without a crs member reads as WGS 84 (RFC 7946), but these coordinates are
    # metres of the raster's custom Albers projection.
    path = geotiff / "sample_geotiff_custom_proj.tif"
    polygons = geotiff / "geotiff_custom_proj_labels.geojson"
    assert "crs" not in json.loads(polygons.read_text())
    target = vector(polygons).target("custom.tif", grid_of(path))
    inside = centres_inside(path, polygons)
    assert inside.sum() > 1000
    assert np.array_equal(target.labels == BUILDING, inside)


def test_geopackage_and_geoparquet_equal_geojson(geotiff, labels, tmp_path):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    expected = vector(labels).target("a.tif", grid).labels
    frame = geopandas.read_file(labels)[["building", "osm_id", "geometry"]]
    frame.to_file(tmp_path / "labels.gpkg", driver="GPKG")
    frame.to_parquet(tmp_path / "labels.parquet")
    for path in (tmp_path / "labels.gpkg", tmp_path / "labels.parquet"):
        assert np.array_equal(vector(path).target("a.tif", grid).labels, expected), path


def test_class_field_takes_each_polygons_class_and_later_features_win(geotiff, labels, tmp_path):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    frame = geopandas.read_file(labels)[["geometry"]]
    frame["kind"] = ["car" if i % 3 == 0 else "building" for i in range(len(frame))]
    # A car drawn over the first building's middle, after it in the file.
    first = frame.geometry.iloc[0]
    car = geopandas.GeoDataFrame(
        {"kind": ["car"]}, geometry=[first.centroid.buffer(2.0)], crs=frame.crs
    )
    path = tmp_path / "kinds.gpkg"
    geopandas.pd.concat([frame, car]).to_file(path, driver="GPKG")
    target = vector(path, "class_field=kind").target("a.tif", grid)
    car_id = CAMVID.classes.index("car")
    assert target.classes == frozenset({BUILDING, car_id})
    with rasterio.open(geotiff / "sample_geotiff.tif") as dataset:
        rows, columns = np.mgrid[0 : dataset.height, 0 : dataset.width]
        xs, ys = dataset.transform @ (columns + 0.5, rows + 0.5)
    cars = shapely.union_all([*frame.geometry[frame.kind == "car"], car.geometry.iloc[0]])
    buildings = shapely.union_all(frame.geometry[frame.kind == "building"])
    in_car, in_building = shapely.contains_xy(cars, xs, ys), shapely.contains_xy(buildings, xs, ys)
    assert in_car.sum() > 1000 and in_building.sum() > 1000
    assert np.array_equal(target.labels == car_id, in_car)
    assert np.array_equal(target.labels == BUILDING, in_building & ~in_car)


def test_background_takes_the_pixels_outside_every_polygon(geotiff, labels):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    # A model with a background class: it is the default, and is evaluated.
    model = ModelClasses("semantic", ("background", "building", "road"))
    target = vector(labels, model=model).target("a.tif", grid)
    assert set(np.unique(target.labels).tolist()) == {0, 1}
    assert int((target.labels == 1).sum()) == SAMPLE_BUILDING_PIXELS
    assert target.classes == frozenset({0, 1})
    named = vector(labels, "class=building&background=sky").target("a.tif", grid)
    assert int((named.labels == 0).sum()) == 900 * 900 - SAMPLE_BUILDING_PIXELS
    assert named.classes == frozenset({0, BUILDING})


def test_only_the_polygons_meeting_the_raster_are_rasterized(geotiff, labels, tmp_path):
    # The same polygons, and the same polygons 10 km away: only the first meet the raster.
    frame = geopandas.read_file(labels)[["geometry"]]
    far = frame.translate(xoff=10_000)
    path = tmp_path / "both.gpkg"
    geopandas.GeoDataFrame(geometry=[*frame.geometry, *far], crs=frame.crs).to_file(path)
    ground_truth = vector(path)
    grid = grid_of(geotiff / "sample_geotiff.tif")
    geometries, _ = ground_truth._on_grid(grid, "test")
    assert len(geometries) == len(frame)
    assert int((ground_truth.target("a.tif", grid).labels == BUILDING).sum()) == (
        SAMPLE_BUILDING_PIXELS
    )


def test_invalid_pixels_are_ignored(geotiff, labels):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    valid = np.ones((900, 900), bool)
    valid[:, :450] = False
    target = within_valid(vector(labels).target("a.tif", grid), valid)
    inside = centres_inside(geotiff / "sample_geotiff.tif", labels)
    assert np.all(target.labels[:, :450] == IGNORE)
    assert int((target.labels == BUILDING).sum()) == int(inside[:, 450:].sum())


# --------------------------------------------------------------------------------------------
# Instances.

INSTANCE_MODEL = ModelClasses("instance", ("__background__", "building"))


def test_instances_one_per_polygon_with_its_pixels(geotiff, labels):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    ground_truth = vector(labels, model=INSTANCE_MODEL)
    assert ground_truth.kind == "instance"
    assert ground_truth.categories == {1: "building"}
    target = ground_truth.target("sample_geotiff.tif", grid)
    assert isinstance(target, InstanceTarget)
    features = json.loads(labels.read_text())["features"]
    assert len(target.annotations) == len(features) == 43
    with rasterio.open(geotiff / "sample_geotiff.tif") as dataset:
        transform = dataset.transform
    rows, columns = np.mgrid[0:900, 0:900]
    xs, ys = transform @ (columns + 0.5, rows + 0.5)
    for annotation, feature in zip(target.annotations, features, strict=True):
        expected = shapely.contains_xy(shapely.geometry.shape(feature["geometry"]), xs, ys)
        segmentation = annotation["segmentation"]
        decoded = coco_mask.decode({**segmentation, "counts": segmentation["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), expected)
        assert annotation["area"] == expected.sum()
        encoded = coco_mask.encode(np.asfortranarray(expected.astype(np.uint8)))
        assert annotation["bbox"] == coco_mask.toBbox(encoded).tolist()
        assert annotation["category_id"] == 1 and annotation["iscrowd"] == 0


def test_a_windows_rle_is_pycocotools_rle_of_the_whole_mask():
    from segflow.groundtruth import _placed_rle

    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 12, 2))
        rows, columns = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        top, left = (
            int(rng.integers(0, height - rows + 1)),
            int(rng.integers(0, width - columns + 1)),
        )
        window = (rng.random((rows, columns)) < rng.choice([0.3, 0.8, 1.0])).astype(np.uint8)
        window[rng.integers(rows), rng.integers(columns)] = 1
        whole = np.zeros((height, width), np.uint8)
        whole[top : top + rows, left : left + columns] = window
        expected = coco_mask.encode(np.asfortranarray(whole))
        measured = _placed_rle(window, top, left, height, width)
        assert measured.rles[0]["counts"] == expected["counts"]
        assert measured.areas[0] == whole.sum()
        assert measured.boxes[0].tolist() == coco_mask.toBbox(expected).tolist()


def test_instance_objects_leave_out_invalid_pixels(geotiff, labels):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    valid = np.ones((900, 900), bool)
    valid[:, :450] = False
    whole = vector(labels, model=INSTANCE_MODEL).target("a.tif", grid).annotations
    clipped = (
        vector(labels, model=INSTANCE_MODEL)
        .target("a.tif", RasterGrid(900, 900, grid.crs, grid.transform, valid))
        .annotations
    )
    inside = centres_inside(geotiff / "sample_geotiff.tif", labels)
    assert 0 < len(clipped) < len(whole)
    assert sum(a["area"] for a in clipped) == inside[:, 450:].sum()


def test_the_polygons_as_detections_score_ap_1(geotiff, labels):
    ground_truth = vector(labels, model=INSTANCE_MODEL)
    target = ground_truth.target("a.tif", grid_of(geotiff / "sample_geotiff.tif"))
    scorer = scorer_for(ground_truth, INSTANCE_MODEL.classes, "instance")
    masks = [
        {
            "class_name": "building",
            "score": 0.9,
            "bbox": a["bbox"],
            "height": 900,
            "width": 900,
            "counts": a["segmentation"]["counts"],
        }
        for a in target.annotations
    ]
    scorer.update(1, masks, target)
    scores = scorer.compute()
    assert scores["segm"].stats[0] == pytest.approx(1.0)
    assert scores["bbox"].stats[0] == pytest.approx(1.0)
    half = scorer_for(ground_truth, INSTANCE_MODEL.classes, "instance")
    half.update(1, masks[::2], target)
    assert half.compute()["segm"].stats[8] == pytest.approx(22 / 43)  # recall, 100 detections


# --------------------------------------------------------------------------------------------
# Unlabelled pixels in the scores.


def test_unlabelled_pixels_count_the_evaluated_classes_false_positives():
    truth = np.full((4, 6), UNLABELLED, np.int64)
    truth[:, :2] = 1  # 8 pixels of class 1 ("building")
    truth[0, 5] = IGNORE
    predicted = np.zeros((4, 6), np.int64)
    predicted[:, 1:3] = 1  # 4 on the building, 4 outside it
    predicted[0, 5] = 1  # ignored
    target = SemanticTarget(truth, "labels", classes=frozenset({1}))
    scorer = SemanticScorer(["sky", "building", "road"])
    figures = scorer.score(1, "a.tif", SemanticPrediction(torch_labels(predicted)), [], target)
    [row] = _rows(scorer)
    assert (row["class_id"], row["gt_pixels"], row["pred_pixels"], row["intersection"]) == (
        1,
        8,
        8,
        4,
    )
    assert row["union"] == 12
    assert figures["miou"] == pytest.approx(4 / 12)  # sky, predicted outside, is not evaluated
    assert figures["pixel_accuracy"] == pytest.approx(4 / 8)


def torch_labels(array: np.ndarray):
    import torch

    return torch.from_numpy(array)


def _rows(scorer: SemanticScorer) -> list[dict]:
    stats = scorer.state()["class_stats"]
    return [dict(zip(stats, values, strict=True)) for values in zip(*stats.values(), strict=True)]


# --------------------------------------------------------------------------------------------
# Errors, before any work.


def test_errors_name_the_spec_the_file_and_the_problem(geotiff, labels, tmp_path):
    def refused(spec: str, model=CAMVID) -> str:
        with pytest.raises(GroundTruthError) as caught:
            open_ground_truth(spec, model=model)
        return str(caught.value)

    message = refused(f"vector:{labels}?class=house")
    assert "'house' is not a class of the model" in message and "building" in message
    assert str(labels) in message
    message = refused(f"vector:{labels}?class_field=kind")
    assert "no property 'kind'" in message and str(labels) in message
    assert "access, addr_house," in message and "(73 in all)" in message
    message = refused(f"vector:{labels}?class_field=building")  # its values are "yes"
    assert "'yes' is not a class of the model" in message
    assert "needs one of ?class=NAME" in refused(f"vector:{labels}")
    assert "needs one of" in refused(f"vector:{labels}?class=building&class_field=x")
    assert "background" in refused(f"vector:{labels}?class=building&background=ground")
    assert "background= applies to semantic" in refused(
        f"vector:{labels}?class=building&background=__background__", INSTANCE_MODEL
    )
    assert "does not exist" in refused(f"vector:{tmp_path / 'none.geojson'}?class=building")
    (tmp_path / "text.geojson").write_text("not a vector file")
    assert "cannot be read as GeoJSON, GeoPackage or GeoParquet" in refused(
        f"vector:{tmp_path / 'text.geojson'}?class=building"
    )
    points = tmp_path / "points.geojson"
    frame = geopandas.read_file(labels)[["geometry"]]
    frame.centroid.to_frame("geometry").to_file(points, driver="GeoJSON")
    assert "43 feature(s) are not polygons, the first feature 0 a Point" in refused(
        f"vector:{points}?class=building"
    )
    unnamed = tmp_path / "unnamed.gpkg"
    frame.assign(kind=["building"] * 42 + [None]).to_file(unnamed)
    assert "1 feature(s) have no 'kind' value" in refused(f"vector:{unnamed}?class_field=kind")
    assert "opened for a model" in refused(f"vector:{labels}?class=building", None)
    with pytest.raises(GroundTruthError, match="ignore_index applies to semantic"):
        open_ground_truth(f"vector:{labels}?class=building", ignore_index=0, model=INSTANCE_MODEL)
    with pytest.raises(GroundTruthError, match="not a georeferenced raster"):
        vector(labels).target("frame.png")


def test_a_raster_without_a_crs_cannot_take_labels_that_name_one(geotiff, labels):
    grid = grid_of(geotiff / "sample_geotiff.tif")
    bare = RasterGrid(900, 900, None, grid.transform)
    with pytest.raises(GroundTruthError, match="the raster has no CRS"):
        vector(labels).target("a.tif", bare)


def test_segment_refuses_an_unknown_class_before_any_work(geotiff, labels, tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import app

    out = tmp_path / "out"
    arguments = segment_arguments(geotiff / "sample_geotiff.tif", f"vector:{labels}?class=house")
    refused = CliRunner().invoke(app, [*arguments, "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert "'house' is not a class of the model" in refused.output
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# GeoTIFF runs evaluated.


def segment_arguments(source: Path, spec: str) -> list[str]:
    """``segflow segment`` of ESPNet (CamVid) over a single-band uint16 scene."""
    model = shared_root() / "models" / "espnet_camvid.pt2"
    options = ["--bands", "1,1,1", "--rescale", "p2,p98"]
    return ["segment", str(source), "--model", str(model), "--gt", spec, *options]


def building_iou(masks: list[dict], truth: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """Intersection and union of the run's building mask (decoded by pycocotools) and the
    ``truth`` pixels, over the ``valid`` ones."""
    [row] = [m for m in masks if m["class_name"] == "building"]
    predicted = coco_mask.decode(
        {"size": [row["height"], row["width"]], "counts": row["counts"].encode()}
    ).astype(bool)
    assert not (predicted & ~valid).any()  # no mask covers an invalid pixel
    truth = truth & valid
    return int((predicted & truth).sum()), int((predicted | truth).sum())


@pytest.fixture(scope="module")
def espnet(shared: Path):
    from segflow.models import load_model

    return load_model(str(shared / "models" / "espnet_camvid.pt2"), device="cpu")


@pytest.mark.slow
def test_a_raster_with_nodata_is_evaluated_on_its_valid_pixels(espnet, geotiff, labels, tmp_path):
    from segflow.shard import segment_images

    # sample_geotiff.tif with a nodata margin (its nodata value is 0; its pixels are 54-6615).
    path = tmp_path / "margin.tif"
    with rasterio.open(geotiff / "sample_geotiff.tif") as dataset:
        profile, pixels = dataset.profile, dataset.read()
    pixels[:, :, :300] = 0
    with rasterio.open(path, "w", **profile) as out:
        out.write(pixels)
    ground_truth = open_ground_truth(
        f"vector:{labels}?class=building", model=ModelClasses.of(espnet)
    )
    options = raster.RasterOptions(bands=(1, 1, 1), rescale=raster.Rescale.parse("p2,p98"))
    result = segment_images(
        espnet,
        [str(path)],
        run_id="vector",
        ground_truth=ground_truth,
        raster_options=options,
        read_timeout=None,
    )
    assert result.tables["errors"].num_rows == 0, result.tables["errors"].to_pylist()
    [image] = result.tables["images"].to_pylist()
    assert image["gt_uri"] == str(labels)
    [stats] = result.tables["class_stats"].to_pylist()  # building alone is evaluated
    valid = np.ones((900, 900), bool)
    valid[:, :300] = False
    inside = centres_inside(geotiff / "sample_geotiff.tif", labels)
    assert stats["class_name"] == "building"
    assert stats["gt_pixels"] == (inside & valid).sum() < SAMPLE_BUILDING_PIXELS
    intersection, union = building_iou(result.tables["masks"].to_pylist(), inside, valid)
    assert (stats["intersection"], stats["union"]) == (intersection, union)
    assert image["miou"] == pytest.approx(intersection / union)


@pytest.mark.integration
@pytest.mark.slow
def test_segment_then_evaluate_gives_the_building_iou(geotiff, labels, tmp_path):
    """The issue's command, on local Ray and Prefect: ESPNet (CamVid) over sample_geotiff.tif
    with its building polygons, then ``segflow evaluate --json``."""
    import duckdb

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "sample_geotiff.tif").symlink_to(geotiff / "sample_geotiff.tif")
    out, log = tmp_path / "out", tmp_path / "segment.log"
    arguments = segment_arguments(corpus, f"vector:{labels}?class=building")
    done = segflow(*arguments, "--out", str(out), log=log)
    assert done.returncode == 0, log.read_text()[-3000:]
    printed = subprocess.run(
        [SEGFLOW, "evaluate", str(out), "--json"], capture_output=True, text=True, check=True
    )
    semantic = json.loads(printed.stdout)["semantic"]
    [run] = out.glob("run=*")
    masks = duckdb.sql(f"SELECT * FROM '{run}/masks/*.parquet'").df().to_dict("records")
    with rasterio.open(geotiff / "sample_geotiff.tif") as dataset:
        valid = dataset.dataset_mask() > 0
    intersection, union = building_iou(
        masks, centres_inside(geotiff / "sample_geotiff.tif", labels), valid
    )
    iou = semantic["per_class_iou"]
    assert iou[BUILDING] == pytest.approx(intersection / union, abs=1e-12)
    assert [value for i, value in enumerate(iou) if i != BUILDING] == [None] * 10
    assert semantic["miou"] == pytest.approx(intersection / union, abs=1e-12)
    print(f"ESPNet (CamVid) building IoU on sample_geotiff.tif: {intersection / union:.4f}")
