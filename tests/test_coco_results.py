"""COCO results files, scored by segflow and by pycocotools' COCOeval on the real COCO subset."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segflow import schema
from segflow.coco_results import coco_results_from_masks, evaluate_coco_results
from segflow.groundtruth import GroundTruthError
from segflow.metrics.instance import CocoEvalError


@pytest.fixture(scope="module")
def gt_file(shared: Path) -> Path:
    return shared / "data" / "coco_val2017_10" / "annotations" / "instances_val2017_subset.json"


@pytest.fixture(scope="module")
def coco(gt_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_file))


def cocoeval_stats(coco: COCO, results: list[dict], iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            detections = coco.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot load an empty list
            detections = COCO()
            detections.dataset = {**coco.dataset, "annotations": []}
            detections.createIndex()
        evaluation = COCOeval(coco, detections, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def without_boxes(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in result.items() if k != "bbox"} for result in results]


@pytest.fixture(scope="module")
def skipped_images(coco: COCO) -> list[int]:
    """Images given no detections at all."""
    return sorted(coco.imgs)[:2]


@pytest.fixture(scope="module")
def jittered_results(coco: COCO, skipped_images: list[int]) -> list[dict]:
    """Detections near the ground truth (crowd included), false positives in any category,
    scores with one decimal (many ties), with both a box and a mask each."""
    rng = np.random.default_rng(7)
    categories = sorted(coco.cats)
    results = []
    for annotation in coco.dataset["annotations"]:
        if annotation["image_id"] in skipped_images:
            continue
        mask = coco.annToMask(annotation)
        for _ in range(int(rng.integers(0, 3))):
            shift = rng.integers(-5, 6, 2)
            results.append(
                {
                    "image_id": annotation["image_id"],
                    "category_id": annotation["category_id"],
                    "score": round(float(rng.random()), 1),
                    "bbox": np.add(annotation["bbox"], rng.normal(0, 3, 4)).tolist(),
                    "segmentation": compressed(np.roll(mask, shift, axis=(0, 1))),
                }
            )
    for image_id, image in coco.imgs.items():
        if image_id in skipped_images:
            continue
        height, width = image["height"], image["width"]
        for _ in range(int(rng.integers(1, 6))):
            x, y = rng.uniform(0, width - 60), rng.uniform(0, height - 60)
            w, h = rng.uniform(3, 60, 2)
            mask = np.zeros((height, width), np.uint8)
            mask[int(y) : int(y + h), int(x) : int(x + w)] = 1
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(categories)),
                    "score": round(float(rng.random()), 1),
                    "bbox": [x, y, w, h],
                    "segmentation": compressed(mask),
                }
            )
    assert any(coco.anns[a]["iscrowd"] for a in coco.getAnnIds(imgIds=list(coco.imgs)))
    assert {r["image_id"] for r in results} == set(coco.imgs) - set(skipped_images)
    return results


# --------------------------------------------------------------------------------------------
# Scores equal COCOeval's.


def test_boxes_score_as_cocoeval(gt_file, coco, jittered_results, tmp_path):
    results = write_json(tmp_path / "results.json", jittered_results)
    scores = evaluate_coco_results(str(gt_file), results, "bbox")
    np.testing.assert_array_equal(scores.stats, cocoeval_stats(coco, jittered_results, "bbox"))
    assert 0.1 < scores.stats[0] < 0.9
    assert scores.categories == tuple(sorted(coco.cats))


def test_masks_score_as_cocoeval(gt_file, coco, jittered_results, tmp_path):
    masks_only = without_boxes(jittered_results)
    results = write_json(tmp_path / "results.json", masks_only)
    scores = evaluate_coco_results(f"file://{gt_file}", f"file://{results}", "segm")
    np.testing.assert_array_equal(scores.stats, cocoeval_stats(coco, masks_only, "segm"))
    assert 0.1 < scores.stats[0] < 0.9


def test_mask_results_score_as_boxes_with_their_mask_boxes(
    gt_file, coco, jittered_results, tmp_path
):
    masks_only = without_boxes(jittered_results)
    results = write_json(tmp_path / "results.json", masks_only)
    scores = evaluate_coco_results(str(gt_file), results, "bbox")
    np.testing.assert_array_equal(scores.stats, cocoeval_stats(coco, masks_only, "bbox"))


def test_segm_results_with_boxes_take_the_box_area_as_loadres_does(
    gt_file, coco, jittered_results, tmp_path
):
    with_boxes = cocoeval_stats(coco, jittered_results, "segm")
    masks_only = cocoeval_stats(coco, without_boxes(jittered_results), "segm")
    assert not np.array_equal(with_boxes, masks_only)  # the area ranges do differ here
    results = write_json(tmp_path / "results.json", jittered_results)
    scores = evaluate_coco_results(str(gt_file), results, "segm")
    np.testing.assert_array_equal(scores.stats, with_boxes)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_results_score_zero_where_there_is_ground_truth(gt_file, coco, tmp_path, iou_type):
    scores = evaluate_coco_results(str(gt_file), write_json(tmp_path / "r.json", []), iou_type)
    expected = cocoeval_stats(coco, [], iou_type)
    np.testing.assert_array_equal(scores.stats, expected)
    assert set(expected.tolist()) <= {0.0, -1.0} and 0.0 in expected


# --------------------------------------------------------------------------------------------
# Results that loadRes refuses, and other bad input.


def test_results_for_images_outside_the_ground_truth_are_refused(gt_file, coco, tmp_path):
    stray = {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 5, 5]}
    with pytest.raises(AssertionError), contextlib.redirect_stdout(io.StringIO()):
        coco.loadRes([stray])
    results = write_json(tmp_path / "results.json", [stray])
    with pytest.raises(CocoEvalError, match="result 0 is for image 1, which the ground truth"):
        evaluate_coco_results(str(gt_file), results, "bbox")


def test_bad_results_are_named(gt_file, jittered_results, tmp_path):
    first = jittered_results[0]
    mask_only = without_boxes([first])[0]
    box_only = {k: v for k, v in first.items() if k != "segmentation"}
    not_json = tmp_path / "not.json"
    not_json.write_text("[{")
    cases = [
        ({"results": [first]}, "bbox", "must be a JSON list of results, got dict"),
        ([first, 3], "bbox", "result 1 is not an object"),
        ([first, mask_only], "bbox", "result 1 lacks a 'bbox' and result 0 does not"),
        ([mask_only, first], "bbox", "result 1 has a 'bbox' and result 0 does not"),
        ([first, box_only], "segm", "result 1 has no 'segmentation' to evaluate as 'segm'"),
        ([{**first, "image_id": True}], "bbox", "result 0 is for image True"),
    ]
    for i, (results, iou_type, message) in enumerate(cases):
        path = write_json(tmp_path / f"results {i}.json", results)
        with pytest.raises(CocoEvalError, match=re.escape(message)):
            evaluate_coco_results(str(gt_file), path, iou_type)
    with pytest.raises(CocoEvalError, match=r"COCO results .*nope\.json' does not exist"):
        evaluate_coco_results(str(gt_file), str(tmp_path / "nope.json"), "bbox")
    with pytest.raises(CocoEvalError, match=r"not\.json' is not valid JSON"):
        evaluate_coco_results(str(gt_file), str(not_json), "bbox")
    with pytest.raises(GroundTruthError, match=r"COCO annotations .*nope\.json' does not exist"):
        evaluate_coco_results(str(tmp_path / "nope.json"), str(not_json), "bbox")


# --------------------------------------------------------------------------------------------
# Results from a run's masks table.


def masks_rows(coco: COCO, class_ids: dict[int, int]) -> tuple[list[dict], dict[int, int]]:
    """A run's instance rows for the subset's non-crowd objects, in its own ids, and each
    row's COCO annotation id."""
    rng = np.random.default_rng(3)
    rows, sources = [], {}
    for image_id, image in coco.imgs.items():
        uri = f"s3://corpus/coco/{image['file_name']}"
        annotations = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        for rank, annotation in enumerate(annotations):
            mask = coco.annToMask(annotation)
            rows.append(
                {
                    "run_id": "r",
                    "image_id": schema.image_id_for(uri),
                    "uri": uri,
                    "instance": rank,
                    "class_id": class_ids[annotation["category_id"]],
                    "class_name": coco.cats[annotation["category_id"]]["name"],
                    "score": float(rng.random()),
                    "bbox": np.add(annotation["bbox"], rng.normal(0, 2, 4)).tolist(),
                    "area": int(mask.sum()),
                    "counts": compressed(mask)["counts"],
                    "height": image["height"],
                    "width": image["width"],
                    "model": "m",
                }
            )
            sources[len(rows) - 1] = annotation["id"]
    return rows, sources


def test_masks_table_round_trips_through_loadres(gt_file, coco, tmp_path):
    # The model's class ids are its own (here: position in a sorted name list).
    names = sorted(category["name"] for category in coco.cats.values())
    class_ids = {c: names.index(coco.cats[c]["name"]) for c in coco.cats}
    rows, sources = masks_rows(coco, class_ids)
    table = schema.table_from_rows("masks", rows)
    image_ids = {
        schema.image_id_for(f"s3://corpus/coco/{image['file_name']}"): image_id
        for image_id, image in coco.imgs.items()
    }
    category_ids = {category["name"]: c for c, category in coco.cats.items()}
    results = coco_results_from_masks(table, image_ids=image_ids, category_ids=category_ids)
    path = write_json(tmp_path / "results.json", results)

    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco.loadRes(path)
    assert len(loaded.anns) == len(rows) == len(results)
    for i, row in enumerate(rows):
        truth = coco.anns[sources[i]]
        detection = loaded.anns[i + 1]  # loadRes numbers results from 1, in file order
        assert detection["image_id"] == truth["image_id"]
        assert detection["category_id"] == truth["category_id"]
        assert detection["score"] == float(np.float32(row["score"]))
        assert detection["bbox"] == row["bbox"]
        np.testing.assert_array_equal(loaded.annToMask(detection), coco.annToMask(truth))

    scores = evaluate_coco_results(str(gt_file), path, "bbox")
    np.testing.assert_array_equal(scores.stats, cocoeval_stats(coco, results, "bbox"))
    scores = evaluate_coco_results(str(gt_file), path, "segm")
    np.testing.assert_array_equal(
        scores.stats, cocoeval_stats(coco, without_boxes(results), "segm")
    )
    # Every non-crowd object found with its own mask: recall 1 wherever there is one.
    assert scores.stats[8] == 1.0


def test_masks_table_keeps_segflow_ids_by_default(coco):
    rows, _ = masks_rows(coco, {c: c + 1000 for c in coco.cats})
    results = coco_results_from_masks(schema.table_from_rows("masks", rows))
    assert [r["image_id"] for r in results] == [row["image_id"] for row in rows]
    assert [r["category_id"] for r in results] == [row["class_id"] for row in rows]
    assert results[0]["segmentation"] == {
        "size": [rows[0]["height"], rows[0]["width"]],
        "counts": rows[0]["counts"],
    }


def test_masks_tables_that_are_no_detections_are_refused(coco):
    rows, _ = masks_rows(coco, {c: c for c in coco.cats})
    semantic = [{**rows[0], "instance": None, "score": None}, *rows[1:]]
    with pytest.raises(CocoEvalError, match=re.escape("1 semantic row(s) (instance is null)")):
        coco_results_from_masks(schema.table_from_rows("masks", semantic))
    table = schema.table_from_rows("masks", rows)
    with pytest.raises(CocoEvalError, match=re.escape("lacks column(s) ['counts']")):
        coco_results_from_masks(table.drop_columns(["counts"]))
    names = {row["class_name"] for row in rows}
    partial = {name: 1 for name in sorted(names)[1:]}
    with pytest.raises(
        CocoEvalError,
        match=re.escape(f"class_name(s) of the masks table, e.g. ['{sorted(names)[0]}']"),
    ):
        coco_results_from_masks(table, category_ids=partial)
    with pytest.raises(CocoEvalError, match=re.escape("image_ids has no entry for")):
        coco_results_from_masks(table, image_ids={})
