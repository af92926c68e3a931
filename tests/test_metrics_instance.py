"""COCO mAP from mergeable per-image records, checked against pycocotools' COCOeval itself.

Every comparison runs COCOeval on the same annotations and detections (built in memory) and
asserts the 12 summary figures, the precision and recall arrays and the per-class AP equal
to the last bit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segflow.metrics import instance
from segflow.metrics.instance import (
    STAT_NAMES,
    CocoEvalError,
    CocoEvaluator,
    CocoScores,
)

# GT areas on and just off the bounds of the small / medium / large ranges.
BOUNDARY_AREAS = (32**2, 96**2, 32**2 - 0.5, 32**2 + 0.5, 96**2 + 0.5)
# Annotations and detections of this category are in no evaluated category list.
UNLISTED_CATEGORY = 10_000


# --------------------------------------------------------------------------------------------
# The reference, and the evaluator fed the same data image by image.


def coco_reference(dataset: dict, detections: list[dict], iou_type: str) -> COCOeval:
    """COCOeval's results (loadRes needs at least one detection)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = copy.deepcopy(dataset)
        ground_truth.createIndex()
        evaluation = COCOeval(
            ground_truth, ground_truth.loadRes(copy.deepcopy(detections)), iou_type
        )
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def per_image(dataset: dict, detections: list[dict]) -> list[tuple[dict, list, list]]:
    inputs = {image["id"]: (image, [], []) for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        inputs[annotation["image_id"]][1].append(annotation)
    for detection in detections:
        inputs[detection["image_id"]][2].append(detection)
    return list(inputs.values())


def evaluator_for(dataset: dict, iou_type: str) -> CocoEvaluator:
    return CocoEvaluator(iou_type, [category["id"] for category in dataset["categories"]])


def update_all(evaluator: CocoEvaluator, inputs: list[tuple[dict, list, list]]) -> CocoEvaluator:
    for image, objects, detections in inputs:
        evaluator.update(
            image["id"], objects, detections, height=image["height"], width=image["width"]
        )
    return evaluator


def assert_same_as_coco(scores: CocoScores, reference: COCOeval) -> None:
    np.testing.assert_array_equal(scores.stats, reference.stats)
    np.testing.assert_array_equal(scores.precision, reference.eval["precision"])
    np.testing.assert_array_equal(scores.recall, reference.eval["recall"])
    # Per-class AP as detectron2 reads it from COCOeval: AP@[.5:.95], all areas, 100 dets.
    for k, category in enumerate(reference.params.catIds):
        assert scores.categories[k] == category
        values = reference.eval["precision"][:, :, k, 0, -1]
        expected = np.mean(values[values > -1]) if (values > -1).any() else -1.0
        assert scores.per_class_ap[k] == expected


def assert_same_scores(a: CocoScores, b: CocoScores) -> None:
    np.testing.assert_array_equal(a.stats, b.stats)
    np.testing.assert_array_equal(a.precision, b.precision)
    np.testing.assert_array_equal(a.recall, b.recall)
    np.testing.assert_array_equal(a.per_class_ap, b.per_class_ap)


# --------------------------------------------------------------------------------------------
# Random data sets with the cases COCOeval treats specially.


def fortran_mask(h: int, w: int, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8, order="F")
    top, bottom, left, right = np.rint([y0, y1, x0, x1]).astype(int)
    mask[top:bottom, left:right] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}


def random_annotation(rng, image_id: int, h: int, w: int, category: int, ann_id: int) -> dict:
    x0, y0 = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
    bw, bh = rng.uniform(2, w - x0), rng.uniform(2, h - y0)
    crowd = int(rng.random() < 0.12)
    annotation = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "iscrowd": crowd,
        "bbox": [x0, y0, bw, bh],
    }
    if crowd:
        mask = fortran_mask(h, w, y0, y0 + bh, x0, x0 + bw)
        rle = coco_mask.encode(mask)
        if rng.random() < 0.5:
            annotation["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
        else:  # uncompressed, as COCO stores crowds
            annotation["segmentation"] = uncompressed_rle(mask)
    else:
        xs = [x0, x0 + bw, x0 + bw * rng.uniform(0.5, 1), x0]
        ys = [y0, y0, y0 + bh, y0 + bh * rng.uniform(0.5, 1)]
        annotation["segmentation"] = [[v for xy in zip(xs, ys, strict=True) for v in xy]]
        if rng.random() < 0.2:  # a second part, merged with the first
            annotation["segmentation"].append([x0, y0, x0 + 3, y0, x0 + 3, y0 + 3])
        rle = coco_mask.merge(coco_mask.frPyObjects(annotation["segmentation"], h, w))
    # The area field decides the range, whatever the mask.
    annotation["area"] = (
        float(rng.choice(BOUNDARY_AREAS)) if rng.random() < 0.2 else float(coco_mask.area(rle))
    )
    if rng.random() < 0.1:
        annotation["ignore"] = 1  # COCOeval overwrites it with iscrowd
    return annotation


def random_detection(rng, image_id: int, h: int, w: int, categories, source, iou_type) -> dict:
    if source is None:
        category = int(rng.choice(categories))
        x, y = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
        bw, bh = rng.uniform(2, w - x), rng.uniform(2, h - y)
    else:
        category = source["category_id"] if rng.random() < 0.9 else int(rng.choice(categories))
        x, y, bw, bh = (v + rng.normal(0, 2) for v in source["bbox"])
        x, y = min(max(x, 0), w - 2), min(max(y, 0), h - 2)
        bw, bh = min(max(bw, 1), w - x), min(max(bh, 1), h - y)
    if rng.random() < 0.15 and min(h, w) >= 32:  # area exactly on a range bound
        side = 96 if min(h, w) >= 96 and rng.random() < 0.5 else 32
        x, y = float(rng.integers(0, w - side + 1)), float(rng.integers(0, h - side + 1))
        bw = bh = float(side)
    tied = rng.random() < 0.5
    score = float(rng.choice([0.25, 0.5, 0.75, 1.0])) if tied else float(rng.random())
    detection = {"image_id": image_id, "category_id": category, "score": score}
    if iou_type == "bbox":
        detection["bbox"] = [float(x), float(y), float(bw), float(bh)]
    else:
        detection["segmentation"] = coco_mask.encode(fortran_mask(h, w, y, y + bh, x, x + bw))
        if rng.random() < 0.5:
            detection["segmentation"]["counts"] = detection["segmentation"]["counts"].decode()
    return detection


def random_dataset(
    seed: int, iou_type: str, n_images: int, n_categories: int, crowded: bool
) -> tuple[dict, list[dict]]:
    """Images of 20 to 120 pixels a side with 0 to 6 objects (the last category never has
    any), jittered and random detections with tied scores, >100 per image when crowded."""
    rng = np.random.default_rng(seed)
    categories = sorted(rng.choice(np.arange(1, 200), n_categories, replace=False).tolist())
    with_objects = categories[:-1] or categories
    images, annotations, detections = [], [], []
    next_id = int(rng.integers(0, 2))  # some data sets number annotations from 0
    for image_id in rng.choice(np.arange(1, 10**6), n_images, replace=False).tolist():
        h, w = (int(v) for v in rng.integers(20, 121, 2))
        images.append({"id": image_id, "height": h, "width": w})
        objects = []
        for _ in range(rng.integers(0, 7)):
            unlisted = rng.random() < 0.05
            category = UNLISTED_CATEGORY if unlisted else int(rng.choice(with_objects))
            objects.append(random_annotation(rng, image_id, h, w, category, next_id))
            next_id += 1
        annotations += objects
        sources = [o for o in objects if rng.random() < 0.8]
        sources += [None] * (int(rng.integers(0, 6)) + (130 if crowded else 0))
        detections += [
            random_detection(rng, image_id, h, w, [*categories, UNLISTED_CATEGORY], s, iou_type)
            for s in sources
        ]
    # loadRes needs a detection; one of an unlisted category is not evaluated.
    image = images[0]
    detections.append(
        random_detection(
            rng, image["id"], image["height"], image["width"], [UNLISTED_CATEGORY], None, iou_type
        )
    )
    dataset = {
        "images": images,
        "categories": [{"id": c} for c in categories],
        "annotations": annotations,
    }
    return dataset, detections


# --------------------------------------------------------------------------------------------
# Generated data sets against COCOeval; merging and state round trips.


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    iou_type=st.sampled_from(["bbox", "segm"]),
    n_images=st.integers(1, 6),
    n_categories=st.integers(1, 5),
    crowded=st.booleans(),
    split=st.randoms(use_true_random=False),
)
def test_generated_data_sets_equal_cocoeval_in_any_merge_order(
    seed, iou_type, n_images, n_categories, crowded, split
):
    dataset, detections = random_dataset(seed, iou_type, n_images, n_categories, crowded)
    reference = coco_reference(dataset, detections, iou_type)
    inputs = per_image(dataset, detections)

    whole = update_all(evaluator_for(dataset, iou_type), inputs).compute()
    assert_same_as_coco(whole, reference)

    # Two workers with a random share each, merged both ways round.
    split.shuffle(inputs)
    cut = split.randint(0, len(inputs))
    left = update_all(evaluator_for(dataset, iou_type), inputs[:cut])
    right = update_all(evaluator_for(dataset, iou_type), inputs[cut:])
    left_state, right_state = left.state(), right.state()
    assert_same_scores(left.merge(right).compute(), whole)
    swapped = CocoEvaluator.from_state(right_state).merge(CocoEvaluator.from_state(left_state))
    assert_same_scores(swapped.compute(), whole)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_many_images_and_categories_equal_cocoeval(iou_type):
    dataset, detections = random_dataset(11, iou_type, 40, 60, crowded=False)
    scores = update_all(evaluator_for(dataset, iou_type), per_image(dataset, detections)).compute()
    assert_same_as_coco(scores, coco_reference(dataset, detections, iou_type))
    assert (scores.per_class_ap > -1).sum() > 20


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matching_in_batches_of_any_size_changes_nothing(monkeypatch, iou_type):
    # Images are matched in batches; with batches of 3, updates match mid-way and merges
    # carry images still to match.
    monkeypatch.setattr(instance, "_MATCH_BATCH", 3)
    dataset, detections = random_dataset(5, iou_type, 14, 4, crowded=True)
    inputs = per_image(dataset, detections)
    left = update_all(evaluator_for(dataset, iou_type), inputs[:8])
    right = update_all(evaluator_for(dataset, iou_type), inputs[8:])
    scores = left.merge(right).compute()
    assert_same_as_coco(scores, coco_reference(dataset, detections, iou_type))


def arrow_round_trip(state: dict) -> dict:
    """Each table through Parquet, the metadata as JSON: as a flow would store a shard."""
    restored = json.loads(
        json.dumps({"iou_type": state["iou_type"], "categories": state["categories"]})
    )
    for name in ("images", "detections", "ground_truth"):
        buffer = io.BytesIO()
        pq.write_table(pa.table(state[name]), buffer)
        table = pq.read_table(io.BytesIO(buffer.getvalue()))
        restored[name] = {column: table[column].to_numpy() for column in table.column_names}
    return restored


def json_round_trip(state: dict) -> dict:
    tables = ("images", "detections", "ground_truth")
    plain = {
        k: ({c: v.tolist() for c, v in state[k].items()} if k in tables else v)
        for k, v in state.items()
    }
    return json.loads(json.dumps(plain))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("round_trip", [arrow_round_trip, json_round_trip])
def test_state_round_trips_through_parquet_and_json(iou_type, round_trip):
    dataset, detections = random_dataset(7, iou_type, 6, 4, crowded=True)
    evaluator = update_all(evaluator_for(dataset, iou_type), per_image(dataset, detections))
    state = evaluator.state()
    restored = round_trip(state)
    assert_same_scores(CocoEvaluator.from_state(restored).compute(), evaluator.compute())
    again = CocoEvaluator.from_state(restored).state()
    for name in ("images", "detections", "ground_truth"):
        for column, values in state[name].items():
            assert again[name][column].dtype == values.dtype
            np.testing.assert_array_equal(again[name][column], values)


def test_empty_state_round_trips_and_scores_minus_one():
    evaluator = CocoEvaluator("bbox", [1, 2])
    restored = CocoEvaluator.from_state(json_round_trip(evaluator.state()))
    scores = restored.compute()
    np.testing.assert_array_equal(scores.stats, -np.ones(12))
    np.testing.assert_array_equal(scores.per_class_ap, [-1.0, -1.0])
    assert list(scores.summary()) == list(STAT_NAMES)


# --------------------------------------------------------------------------------------------
# The cases one at a time, each against COCOeval.


def square_dataset(boxes_per_image: list[list[list[float]]], size: int = 200) -> dict:
    annotations = []
    for image_index, boxes in enumerate(boxes_per_image):
        for x, y, w, h in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
    return {
        "images": [
            {"id": i + 1, "height": size, "width": size} for i in range(len(boxes_per_image))
        ],
        "categories": [{"id": 1}, {"id": 2}],
        "annotations": annotations,
    }


def box_detection(image_id, box, score, category=1):
    return {"image_id": image_id, "category_id": category, "score": score, "bbox": box}


def check_bbox_case(dataset: dict, detections: list[dict]) -> CocoScores:
    scores = update_all(evaluator_for(dataset, "bbox"), per_image(dataset, detections)).compute()
    assert_same_as_coco(scores, coco_reference(dataset, detections, "bbox"))
    return scores


def test_tied_scores_across_images_pool_in_image_id_order():
    # Same score: a hit in image 2 and a miss in image 1. Pooled in image order, the miss
    # comes first and precision at the first recall level is 1/2, not 1.
    dataset = square_dataset([[[10, 10, 40, 40]], [[10, 10, 40, 40]]])
    detections = [
        box_detection(2, [10, 10, 40, 40], 0.5),
        box_detection(1, [150, 150, 40, 40], 0.5),
        box_detection(1, [10, 10, 40, 40], 0.4),
    ]
    scores = check_bbox_case(dataset, detections)
    assert scores.per_class_ap[1] == -1.0  # category 2 has no ground truth


def test_tied_scores_in_one_image_keep_detection_order():
    dataset = square_dataset([[[10, 10, 40, 40]]])
    hit, miss = [10, 10, 40, 40], [100, 100, 40, 40]
    first_hit = check_bbox_case(dataset, [box_detection(1, hit, 0.5), box_detection(1, miss, 0.5)])
    first_miss = check_bbox_case(dataset, [box_detection(1, miss, 0.5), box_detection(1, hit, 0.5)])
    assert first_hit.stats[0] > first_miss.stats[0]


def test_equal_ious_go_to_the_later_ground_truth():
    # The first detection overlaps both objects equally (IoU 9/11). Taking the second leaves
    # the first object to the next detection (IoU 1); taking the first would leave it the
    # second object, at IoU 2/3 only.
    dataset = square_dataset([[[0, 0, 10, 10], [2, 0, 10, 10]]])
    detections = [box_detection(1, [1, 0, 10, 10], 0.9), box_detection(1, [0, 0, 10, 10], 0.8)]
    check_bbox_case(dataset, detections)


def test_only_the_100_best_detections_per_image_and_category_count():
    dataset = square_dataset([[[10, 10, 40, 40], [100, 100, 40, 40]]])
    # 150 misses, then the hits with the lowest scores: beyond 100 they are dropped.
    misses = [box_detection(1, [60, 60 + i % 20, 5, 5], 0.9 - i * 1e-3) for i in range(150)]
    hits = [box_detection(1, [10, 10, 40, 40], 0.1), box_detection(1, [100, 100, 40, 40], 0.95)]
    scores = check_bbox_case(dataset, [*misses, *hits])
    assert 0 < scores.stats[8] < 1  # AR@100: one of the two hits is in the top 100


def test_areas_on_the_range_bounds_are_inside_both_ranges():
    # 32x32 = 32**2 and 96x96 = 96**2: COCO's bounds are inclusive on both sides.
    dataset = square_dataset([[[0, 0, 32, 32], [50, 50, 96, 96], [0, 160, 20, 20]]])
    detections = [
        box_detection(1, [0, 0, 32, 32], 0.9),
        box_detection(1, [50, 50, 96, 96], 0.8),
        box_detection(1, [2, 160, 20, 20], 0.7),
        box_detection(1, [150, 0, 32, 32], 0.6),  # misses, on the small/medium bound
    ]
    check_bbox_case(dataset, detections)


def test_images_without_detections_or_ground_truth_count():
    dataset = square_dataset([[[10, 10, 40, 40]], [], [[60, 60, 50, 50]]])
    detections = [box_detection(1, [10, 10, 40, 40], 0.9), box_detection(2, [0, 0, 9, 9], 0.8)]
    scores = check_bbox_case(dataset, detections)
    assert scores.stats[8] == 0.5  # the object of image 3 was missed


def test_crowd_ground_truth_absorbs_any_number_of_detections():
    dataset = square_dataset([[[10, 10, 100, 100], [150, 150, 40, 40]]])
    dataset["annotations"][0]["iscrowd"] = 1
    inside = [box_detection(1, [10 + 5 * i, 10, 20, 20], 0.9 - 0.1 * i) for i in range(5)]
    scores = check_bbox_case(dataset, [*inside, box_detection(1, [150, 150, 40, 40], 0.1)])
    assert scores.stats[0] == pytest.approx(1.0)  # crowd hits are ignored, not false positives


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_detections_given_as_masks_only(iou_type):
    # loadRes gives mask-only results the mask's area, and for "bbox" the mask's box.
    dataset = square_dataset([[[10, 10, 40, 40], [60, 60, 30, 30]]], size=100)
    detections = []
    for i, (x, y, w, h) in enumerate([(10, 12, 40, 36), (58, 60, 32, 32), (0, 0, 5, 90)]):
        mask = fortran_mask(100, 100, y, y + h, x, x + w)
        rle = coco_mask.encode(mask)
        detections.append(
            {"image_id": 1, "category_id": 1, "score": 0.9 - 0.1 * i, "segmentation": rle}
        )
    scores = update_all(evaluator_for(dataset, iou_type), per_image(dataset, detections)).compute()
    assert_same_as_coco(scores, coco_reference(dataset, detections, iou_type))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_real_coco_subset_with_synthetic_detections(shared, iou_type):
    path = shared / "data" / "coco_val2017_10" / "annotations" / "instances_val2017_subset.json"
    dataset = json.loads(path.read_text())
    rng = np.random.default_rng(2024)
    sizes = {image["id"]: (image["height"], image["width"]) for image in dataset["images"]}
    category_ids = [category["id"] for category in dataset["categories"]]
    detections = []
    for annotation in dataset["annotations"]:
        h, w = sizes[annotation["image_id"]]
        for _ in range(int(rng.integers(0, 3))):
            if isinstance(annotation["segmentation"], list):
                shift = rng.normal(0, 4, 2)
                parts = [
                    (np.reshape(part, (-1, 2)) + shift).ravel().tolist()
                    for part in annotation["segmentation"]
                ]
                rle = coco_mask.merge(coco_mask.frPyObjects(parts, h, w))
            else:
                rle = coco_mask.frPyObjects(annotation["segmentation"], h, w)
            box = np.add(annotation["bbox"], rng.normal(0, 3, 4)).tolist()
            detections.append(
                {
                    "image_id": annotation["image_id"],
                    "category_id": annotation["category_id"],
                    "score": round(float(rng.random()), 2),
                    **({"bbox": box} if iou_type == "bbox" else {"segmentation": rle}),
                }
            )
    for image_id, (h, w) in sizes.items():  # false positives, some in absent categories
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            bw, bh = rng.uniform(5, 40, 2)
            geometry = (
                {"bbox": [x, y, bw, bh]}
                if iou_type == "bbox"
                else {"segmentation": coco_mask.encode(fortran_mask(h, w, y, y + bh, x, x + bw))}
            )
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "score": round(float(rng.random()), 2),
                    **geometry,
                }
            )

    reference = coco_reference(dataset, detections, iou_type)
    inputs = per_image(dataset, detections)
    shards = [update_all(evaluator_for(dataset, iou_type), inputs[i::3]) for i in range(3)]
    merged = CocoEvaluator.from_state(arrow_round_trip(shards[2].state()))
    merged.merge(shards[0]).merge(shards[1])
    scores = merged.compute()
    assert_same_as_coco(scores, reference)
    assert 0 < scores.stats[0] < 1


# --------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_named():
    with pytest.raises(CocoEvalError, match="iou_type"):
        CocoEvaluator("keypoints", [1])
    with pytest.raises(CocoEvalError, match="duplicates"):
        CocoEvaluator("bbox", [1, 1])
    evaluator = CocoEvaluator("segm", [1])
    polygon = {"category_id": 1, "area": 4.0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}
    with pytest.raises(CocoEvalError, match=r"annotations\[0\].*height and width"):
        evaluator.update(1, [polygon], [])
    with pytest.raises(CocoEvalError, match=r"annotations\[1\] has no 'area'"):
        evaluator.update(1, [polygon, {"category_id": 1}], [], height=4, width=4)
    with pytest.raises(CocoEvalError, match=r"detections\[0\]\['score'\] is NaN"):
        evaluator.update(1, [], [{"category_id": 1, "score": float("nan")}])
    with pytest.raises(CocoEvalError, match=r"detections\[0\] has no 'segmentation'"):
        evaluator.update(1, [], [{"category_id": 1, "score": 1.0, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(CocoEvalError, match="RLE size"):
        evaluator.update(
            1, [], [{"category_id": 1, "score": 1, "segmentation": {"size": 3, "counts": ""}}]
        )
    with pytest.raises(CocoEvalError, match="image_id"):
        evaluator.update("a", [], [])

    boxes = CocoEvaluator("bbox", [1])
    with pytest.raises(CocoEvalError, match=r"\['bbox'\] must be 4 finite numbers"):
        boxes.update(1, [{"category_id": 1, "area": 1, "bbox": [0, 0, 1]}], [])
    boxes.update(1, [], [])
    with pytest.raises(CocoEvalError, match="image 1 was already evaluated"):
        boxes.update(1, [], [])
    with pytest.raises(CocoEvalError, match="evaluated twice"):
        boxes.merge(CocoEvaluator("bbox", [1]).update(1, [], []))
    with pytest.raises(CocoEvalError, match="cannot merge"):
        boxes.merge(CocoEvaluator("segm", [1]))
    with pytest.raises(TypeError, match="CocoEvaluator"):
        boxes.merge(object())


def test_bad_state_is_named():
    state = (
        CocoEvaluator("bbox", [1])
        .update(
            1,
            [{"category_id": 1, "area": 1, "bbox": [0, 0, 1, 1]}],
            [box_detection(1, [0, 0, 1, 1], 1.0)],
        )
        .state()
    )
    without = {**state, "detections": {k: v for k, v in state["detections"].items() if k != "rank"}}
    with pytest.raises(CocoEvalError, match="no column 'rank'"):
        CocoEvaluator.from_state(without)
    out_of_range = {**state, "detections": {**state["detections"], "matched_all": [70000]}}
    with pytest.raises(CocoEvalError, match="out of range"):
        CocoEvaluator.from_state(out_of_range)
    stranger = {**state, "ground_truth": {**state["ground_truth"], "category_id": [5]}}
    with pytest.raises(CocoEvalError, match="categories not evaluated"):
        CocoEvaluator.from_state(stranger)
