"""Sliced inference of instance models (segflow.slicing) on a generated GeoTIFF larger than a
slice, with objects planted across slice edges and corners: each comes out once, whole."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

rasterio = pytest.importorskip("rasterio")

from segflow import raster, rle, slicing  # noqa: E402
from segflow.job import Job, JobError  # noqa: E402
from segflow.preflight import check_job  # noqa: E402
from segflow.shard import segment_images  # noqa: E402
from tests.user_models import BlobModel  # noqa: E402

HEIGHT, WIDTH = 700, 900
SLICES = slicing.Slicing(size=256, overlap=64)
NMS = dataclasses.replace(SLICES, merge="nms")
# Slice rows start at 0, 192, 384, 444; columns at 0, 192, 384, 576, 644: slice edges at
# x = 256, 448, 640, 832 and y = 256, 448, overlap strips 64 wide.
NODATA = (slice(440, None), slice(640, None))  # holds the last slice, (444, 644), whole

SMALL = {  # each within one slice, crossing the edge of another
    1: ("rect", 100, 140, 240, 280),  # across the column edge x = 256
    2: ("disc", 256, 256, 20),  # on the corner of four slices
    3: ("rect", 240, 270, 50, 90),  # across the row edge y = 256
    4: ("rect", 400, 430, 436, 448),  # 4 and 5 touch, either side of the edge x = 448
    5: ("rect", 400, 430, 448, 462),
    6: ("disc", 600, 300, 25),  # inside the overlap of two slice rows, whole in both
}
LARGE = {  # larger than the overlap: only merging gets 7 and 8 whole
    7: ("rect", 20, 50, 150, 560),  # wider than a slice: three slice columns
    8: ("rect", 150, 330, 600, 760),  # whole in no slice
    9: ("disc", 520, 130, 90),  # whole in one slice, cut by three others
}


def planted(shape: tuple) -> np.ndarray:
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    if shape[0] == "rect":
        _, top, bottom, left, right = shape
        return (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
    _, y, x, radius = shape
    return (rows - y) ** 2 + (columns - x) ** 2 <= radius**2


def write_raster(path: Path, objects: dict[int, tuple], *, masked: bool = False) -> Path:
    """A georeferenced RGB GeoTIFF: grey ground, object ``i`` blue 255 with its id in red and
    green (what :class:`BlobModel` sees), a nodata corner: 0 pixels, or with ``masked``,
    pixels as they are under a mask band that says they are invalid."""
    from rasterio.transform import Affine

    pixels = np.full((3, HEIGHT, WIDTH), 40, np.uint8)
    for object_id, shape in objects.items():
        where = planted(shape)
        pixels[0][where], pixels[1][where], pixels[2][where] = (
            object_id % 256,
            object_id // 256,
            255,
        )
    if not masked:
        pixels[(slice(None), *NODATA)] = 0
    profile = {
        "driver": "GTiff",
        "height": HEIGHT,
        "width": WIDTH,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0, 500000.0, 0, -0.5, 4650000.0),
        "nodata": None if masked else 0,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
    }
    with rasterio.open(path, "w", **profile) as out:
        out.write(pixels)
        if masked:
            out.write_mask(valid_pixels())
    return path


def valid_pixels() -> np.ndarray:
    valid = np.ones((HEIGHT, WIDTH), bool)
    valid[NODATA] = False
    return valid


def bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


def sliced(path: Path, settings: slicing.Slicing, model: BlobModel | None = None):
    source = raster.open_raster(str(path), raster.RasterOptions())
    try:
        return slicing.segment_sliced(
            model or BlobModel(torch.device("cpu")),
            slicing.raster_reader(source),
            HEIGHT,
            WIDTH,
            settings,
        )
    finally:
        source.close()


def object_at(objects: dict, y: int, x: int) -> int:
    return next(i for i, shape in objects.items() if planted(shape)[y, x])


def assert_each_object_once_whole(found: slicing.SlicedDetections, objects: dict) -> dict:
    """Each of ``objects`` is one detection, mask and box exactly its own; their scores."""
    masks = rle.decode_masks(found.encoded.rles).astype(bool)
    assert len(found) == len(objects)
    scores = {}
    for mask, box, area, score in zip(
        masks, found.boxes.tolist(), found.encoded.areas, found.scores, strict=True
    ):
        object_id = object_at(objects, *np.argwhere(mask)[0])
        expected = planted(objects[object_id])
        np.testing.assert_array_equal(mask, expected, err_msg=f"object {object_id}")
        assert box == bbox(expected) and area == expected.sum()
        scores[object_id] = float(score)
    assert sorted(scores) == sorted(objects)  # each once
    assert np.all(np.diff(found.scores) <= 0)  # by descending score
    return scores


def test_mask_iou_merging_gives_each_object_once_whole(tmp_path):
    objects = SMALL | LARGE
    model = BlobModel(torch.device("cpu"))
    found = sliced(write_raster(tmp_path / "blobs.tif", objects), SLICES, model)
    scores = assert_each_object_once_whole(found, objects)
    windows = SLICES.windows(HEIGHT, WIDTH)
    assert len(windows) == 20 and len(model.sizes) == 19  # the nodata slice is not run
    assert model.batches == [1] * 19
    assert max(model.sizes) == (256, 256)
    # Whole views score 0.9, cut ones 0.6; a merged object scores its best view.
    assert scores == pytest.approx(dict.fromkeys([*SMALL, 9], 0.9) | {7: 0.6, 8: 0.6})


def test_nms_keeps_each_small_object_once_whole(tmp_path):
    found = sliced(write_raster(tmp_path / "small.tif", SMALL), NMS)
    assert assert_each_object_once_whole(found, SMALL) == pytest.approx(dict.fromkeys(SMALL, 0.9))


def test_nms_cuts_an_object_that_no_slice_holds_whole(tmp_path):
    """What the docstring says of nms: an object larger than the overlap keeps cut views
    (here two, side by side), where merging unites them."""
    objects = {8: LARGE[8]}
    path = write_raster(tmp_path / "large.tif", objects)
    pieces = rle.decode_masks(sliced(path, NMS).encoded.rles).astype(bool)
    whole = planted(objects[8])
    assert len(pieces) == 2 and not (pieces & ~whole).any()
    assert pieces.sum(0).max() == 1 and pieces.sum() < whole.sum()
    assert_each_object_once_whole(sliced(path, SLICES), objects)


def test_the_rows_equal_pycocotools_on_the_full_plane(tmp_path):
    objects = SMALL | LARGE
    found = sliced(write_raster(tmp_path / "blobs.tif", objects), SLICES)
    planes = np.stack([planted(shape) for shape in objects.values()], axis=2).astype(np.uint8)
    expected = {e["counts"] for e in coco_mask.encode(np.asfortranarray(planes))}
    assert {r["counts"] for r in found.encoded.rles} == expected
    assert all(r["size"] == [HEIGHT, WIDTH] for r in found.encoded.rles)


def test_masks_are_held_cropped_to_their_boxes(tmp_path):
    """The largest array held per detection is its box: each slice's view of an object is
    held as the crop of what that slice shows of it, a merged object as its own box."""
    objects = SMALL | LARGE
    path = write_raster(tmp_path / "blobs.tif", objects)
    windows = SLICES.windows(HEIGHT, WIDTH)
    source = raster.open_raster(str(path), raster.RasterOptions())
    try:
        model = BlobModel(torch.device("cpu"))
        held = slicing.detect_slices(model, slicing.raster_reader(source), windows)
    finally:
        source.close()
    assert len(held) > len(objects)
    for detection in held:
        top, bottom, left, right = windows[detection.slice]
        seen = np.zeros((HEIGHT, WIDTH), bool)
        seen[top:bottom, left:right] = True
        y, x = np.argwhere(detection.mask)[0]
        view = planted(objects[object_at(objects, detection.top + y, detection.left + x)]) & seen
        x, y, w, h = (int(v) for v in bbox(view))
        assert (detection.top, detection.left, detection.mask.shape) == (y, x, (h, w))
        np.testing.assert_array_equal(detection.mask, view[y : y + h, x : x + w])
    merged = slicing.merge_detections(held, windows, SLICES)
    shapes = sorted(d.mask.shape for d in merged)
    assert shapes == sorted(
        (int(bbox(planted(s))[3]), int(bbox(planted(s))[2])) for s in objects.values()
    )
    assert max(d.mask.size for d in held + merged) <= 180 * 410 < HEIGHT * WIDTH / 8


def test_invalid_pixels_are_in_no_mask(tmp_path):
    """A model that also sees objects on nodata (as a model may): the masks lose those pixels."""
    objects = {10: ("rect", 420, 470, 600, 700)}  # over the invalid corner, in a mask band
    found = sliced(write_raster(tmp_path / "edge.tif", objects, masked=True), SLICES)
    (mask,) = rle.decode_masks(found.encoded.rles).astype(bool)
    np.testing.assert_array_equal(mask, planted(objects[10]) & valid_pixels())
    assert 0 < mask.sum() < planted(objects[10]).sum()


def test_crops_encode_as_the_full_planes_under_pycocotools():
    rng = np.random.default_rng(7)
    height, width = 37, 23
    crops, planes = [], []
    for top, left, h, w in [
        (0, 0, 37, 23),
        (0, 5, 37, 4),
        (3, 2, 10, 9),
        (36, 22, 1, 1),
        (5, 5, 0, 3),
    ]:
        mask = rng.random((h, w)) < 0.6
        plane = np.zeros((height, width), np.uint8)
        plane[top : top + h, left : left + w] = mask
        crops.append((top, left, mask))
        planes.append(plane)
    got = rle.encode_crops_measured(crops, height, width)
    expected = coco_mask.encode(np.asfortranarray(np.stack(planes, axis=2)))
    assert [r["counts"] for r in got.rles] == [e["counts"] for e in expected]
    np.testing.assert_array_equal(got.areas, coco_mask.area(expected))
    np.testing.assert_array_equal(got.boxes, coco_mask.toBbox(expected))
    with pytest.raises(rle.RLEError, match="outside the 37x23 grid"):
        rle.encode_crops_measured([(30, 0, np.ones((8, 1), bool))], height, width)


def test_a_shard_writes_one_row_per_object_of_a_geotiff(tmp_path):
    objects = SMALL | LARGE
    path = str(write_raster(tmp_path / "blobs.tif", objects))
    model = BlobModel(torch.device("cpu"))
    result = segment_images(
        model, [path], run_id="sliced", read_timeout=None, slicing=SLICES, batch_size=8
    )
    assert model.batches == [8, 8, 3]  # the 19 slices with valid pixels
    (image,) = result.tables["images"].to_pylist()
    assert image["status"] == "ok" and image["crs"] == "EPSG:32633", result.tables["errors"]
    assert (image["height"], image["width"], image["num_masks"]) == (HEIGHT, WIDTH, 9)
    rows = result.tables["masks"].to_pylist()
    assert [row["instance"] for row in rows] == list(range(9))
    assert {row["class_name"] for row in rows} == {"blob"}
    masks = rle.decode_masks([{"size": [HEIGHT, WIDTH], "counts": r["counts"]} for r in rows])
    assert sorted(m.sum() for m in masks) == sorted(planted(s).sum() for s in objects.values())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"slice_size": 0}, "--slice-size must be at least 1"),
        ({"slice_size": 256, "slice_overlap": 256}, "--slice-overlap must be in [0, "),
        ({"slice_overlap": 2000}, "--slice-overlap must be in [0, --slice-size=1024)"),
        ({"slice_merge": "nmm"}, "--slice-merge must be one of mask-iou, nms"),
        ({"slice_match": 0}, "--slice-match must be in (0, 1]"),
        ({"slice_size": "big"}, "--slice-size must be int"),
    ],
)
def test_bad_slicing_is_an_error_naming_its_option(settings, message):
    with pytest.raises((JobError, slicing.SlicingError)) as raised:
        Job(input="in", model="m", out="o", **settings)
    assert message in str(raised.value)


def test_a_semantic_user_model_given_slices_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    job = Job(
        input=str(tmp_path),
        model="tests.user_models:make_brightness_model",
        out=str(out),
        slice_size=256,
    )
    with pytest.raises(JobError, match="--slice-size applies to instance models only"):
        check_job(job)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_geotiff_runs_sliced_through_the_cli_on_ray(tmp_path):
    import duckdb

    from tests.conftest import REPO_ROOT
    from tests.test_segment_flow import Cli

    objects = SMALL | LARGE
    corpus = tmp_path / "in"
    corpus.mkdir()
    path = write_raster(corpus / "blobs.tif", objects)
    out = tmp_path / "out"
    args = [str(corpus), "--model", "tests.user_models:make_blob_model", "--out", str(out)]
    args += ["--run-id", "s", "--slice-size", "256", "--slice-overlap", "64"]
    args += ["--slice-merge", "mask-iou", "--cpus-per-actor", "1", "--prefetch-threads", "1"]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    returncode, output = Cli(*args, log=tmp_path / "cli.log", env=env).wait()
    assert returncode == 0, output
    run = out / "run=s"
    assert json.loads((run / "run.json").read_text())["slicing"] == SLICES.as_config()
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT uri, height, width, bbox, score, counts FROM '{run}/masks/*.parquet' "
        "ORDER BY instance"
    ).fetchall()
    assert {(uri, height, width) for uri, height, width, *_ in rows} == {
        (path.as_uri(), HEIGHT, WIDTH)
    }
    assert len(rows) == len(objects)
    for *_, box, _, counts in rows:
        mask = coco_mask.decode({"size": [HEIGHT, WIDTH], "counts": counts}).astype(bool)
        expected = planted(objects[object_at(objects, *np.argwhere(mask)[0])])
        np.testing.assert_array_equal(mask, expected)
        assert box == bbox(expected)
    assert [row[4] for row in rows] == sorted((row[4] for row in rows), reverse=True)


@pytest.mark.slow
def test_a_registered_instance_model_runs_sliced_on_a_shared_raster(shared, tmp_path):
    """Mask R-CNN (seeded weights: its detections are arbitrary, their bookkeeping is not)
    over RGB.byte.tif in slices: masks on the raster's grid, inside its valid pixels, boxes
    inside the raster, by descending score."""
    from segflow.models import load_model
    from tests.test_models_torchvision import DETECTION_SIZES, seeded_network

    network = seeded_network("maskrcnn_resnet50_fpn", box_score_thresh=0.0, **DETECTION_SIZES)
    state = {k: v for k, v in network.state_dict().items() if "num_batches_tracked" not in k}
    weights = tmp_path / "maskrcnn.pth"
    torch.save(state, weights)
    model = load_model(
        "maskrcnn_resnet50_fpn",
        device="cpu",
        weights=weights,
        score_threshold=0.0,
        max_detections=20,
        mask_threshold=0.3,
        **DETECTION_SIZES,
    )
    uri = str(shared / "data" / "geotiff" / "RGB.byte.tif")
    result = segment_images(
        model,
        [uri],
        run_id="rcnn",
        read_timeout=None,
        slicing=slicing.Slicing(384, 96),
        batch_size=2,
    )
    (image,) = result.tables["images"].to_pylist()
    assert image["status"] == "ok", result.tables["errors"].to_pylist()
    rows = result.tables["masks"].to_pylist()
    assert rows and image["num_masks"] == len(rows)
    with rasterio.open(uri) as dataset:
        valid = dataset.dataset_mask() > 0
    masks = rle.decode_masks([{"size": [718, 791], "counts": r["counts"]} for r in rows])
    assert not (masks.astype(bool) & ~valid).any()
    for mask, row in zip(masks, rows, strict=True):
        x, y, w, h = row["bbox"]
        assert 0 <= x <= x + w <= 791 and 0 <= y <= y + h <= 718  # clipped to the raster
        assert row["area"] == mask.sum()
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True)


def test_an_instance_geotiff_is_evaluated_against_its_polygons(tmp_path):
    """Ground truth as GIS users have it: the planted objects as polygons (``vector:``), one
    COCO object each; COCOeval on the sliced detections finds every one, and a detection
    without its polygon is a false positive."""
    from rasterio import features

    from segflow.evaluation import evaluate_run
    from segflow.groundtruth import ModelClasses, open_ground_truth
    from segflow.manifest import Shard
    from segflow.preflight import evaluation_info
    from segflow.store import RunStore

    objects = SMALL | LARGE
    path = write_raster(tmp_path / "blobs.tif", objects)
    with rasterio.open(path) as dataset:
        transform = dataset.transform

    def polygons(ids) -> Path:
        shapes = [
            geometry
            for i in ids
            for geometry, _ in features.shapes(
                planted(objects[i]).astype(np.uint8), mask=planted(objects[i]), transform=transform
            )
        ]
        collection = {
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
            "features": [{"type": "Feature", "properties": {}, "geometry": g} for g in shapes],
        }
        out = tmp_path / f"objects-{len(ids)}.geojson"
        out.write_text(json.dumps(collection))
        return out

    def evaluated(labels: Path) -> dict:
        model = BlobModel(torch.device("cpu"))
        gt = f"vector:{labels}?class=blob"
        info = evaluation_info(model, gt, None)
        result = segment_images(
            model,
            [str(path)],
            run_id="e",
            read_timeout=None,
            slicing=SLICES,
            ground_truth=open_ground_truth(gt, model=ModelClasses.of(model)),
        )
        assert not result.tables["errors"].num_rows, result.tables["errors"].to_pylist()
        store = RunStore(str(tmp_path / labels.stem), "e")
        store.prepare({"input": labels.stem})
        summary = {"shard": 0, "images": 1, "failed": 0, "not_evaluated": 0}
        summary["masks"] = result.tables["masks"].num_rows
        store.commit_shard(Shard(0, 0, 1), result.tables, summary)
        store.write_json("evaluation.json", info)
        return evaluate_run(str(tmp_path / labels.stem))

    every = evaluated(polygons(sorted(objects)))
    assert every["images"] == {"selected": 1, "evaluated": 1}
    for iou_type in ("segm", "bbox"):
        stats = coco_stats(every, iou_type)
        assert stats["AP"] == stats["AR100"] == 1.0, (iou_type, stats)
    # Object 9 without its polygon: its detection is a false positive, the rest all found.
    some = evaluated(polygons([i for i in sorted(objects) if i != 9]))
    stats = coco_stats(some, "segm")
    assert stats["AP"] < 1.0 and stats["AR100"] == 1.0, stats


def coco_stats(result: dict, iou_type: str) -> dict[str, float]:
    figures = result["instance"][iou_type]
    return dict(zip(figures["stat_names"], figures["stats"], strict=True))
