"""COCO mAP: segflow's mergeable CocoEvaluator against pycocotools' COCOeval (and
faster-coco-eval when importable), on the same generated data, in one process.

The data set is synthetic and deterministic: 5000 small images (48 to 224 pixels a side, so
that every COCO area range occurs and masks stay cheap), 80 categories, ground truth as
polygons with a few crowd RLEs, and about 10 detections per image: jittered copies of the
objects (some duplicated, some with the wrong category) and false positives, scores rounded
to 3 decimals so that ties occur. Both IoU types run on it. A second, "dense" set has a tenth
of the images and about 90 detections per image (10 to 29 guesses per object), as a
detector's top 100 gives: there every detection contends for the same few objects.

Timed, each from per-image inputs to the 12 figures:
- pycocotools: ``loadRes`` + ``evaluate`` + ``accumulate`` + ``summarize`` (the ground truth
  ``COCO`` object is built beforehand, as a loaded data set);
- faster-coco-eval: the same through its API;
- segflow: ``update`` per image on 4 evaluators (as 4 workers would), their ``state`` rebuilt
  with ``from_state`` and merged, ``compute``.

faster-coco-eval is not a project dependency: install it aside (``pip install --no-deps
--target /tmp/fce faster-coco-eval``) and point ``FCE_PATH`` at it (default /tmp/fce);
without it that column is skipped.

Run: ``python bench/coco_map.py [--images N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segflow.metrics.instance import CocoEvaluator

SEED = 0
CATEGORIES = list(range(1, 81))
WORKERS = 4


def outline(rng: np.random.Generator, rx: float, ry: float) -> np.ndarray:
    """A star-shaped polygon around the origin, (N, 2)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(6, 14))))
    radius = rng.uniform(0.7, 1.0, len(angles))
    return np.stack([rx * radius * np.cos(angles), ry * radius * np.sin(angles)], axis=1)


def placed(shape: np.ndarray, cx: float, cy: float) -> list[float]:
    """The outline centred on (cx, cy), flattened as COCO stores polygons."""
    return (shape + np.array([cx, cy])).ravel().round(2).tolist()


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}


def generate(n_images: int, copies: tuple[int, int]) -> tuple[dict, list[dict]]:
    """A COCO ground-truth data set and results with both ``bbox`` and ``segmentation``:
    ``copies`` (low, high) jittered guesses at each object, and up to 7 false positives."""
    rng = np.random.default_rng(SEED)
    images, annotations, results = [], [], []
    for image_id in range(1, n_images + 1):
        h, w = (int(v) for v in rng.integers(48, 225, 2))
        images.append({"id": image_id, "height": h, "width": w})
        present = rng.choice(CATEGORIES, int(rng.integers(1, 5)), replace=False)
        objects = []
        for _ in range(int(rng.integers(1, 9))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
            category = int(rng.choice(present))
            shape = outline(rng, rx, ry)
            objects.append((category, cx, cy, shape))
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category}
            if rng.random() < 0.03:
                mask = np.zeros((h, w), np.uint8)
                mask[int(max(cy - ry, 0)) : int(cy + ry), int(max(cx - rx, 0)) : int(cx + rx)] = 1
                ann["segmentation"] = uncompressed_rle(mask)
                ann["iscrowd"] = 1
                rle = coco_mask.frPyObjects(ann["segmentation"], h, w)
            else:
                ann["segmentation"] = [placed(shape, cx, cy)]
                ann["iscrowd"] = 0
                rle = coco_mask.merge(coco_mask.frPyObjects(ann["segmentation"], h, w))
            ann["area"] = float(coco_mask.area(rle))
            ann["bbox"] = coco_mask.toBbox(rle).tolist()
            annotations.append(ann)

        guesses = [o for o in objects for _ in range(int(rng.integers(*copies)))]
        guesses += [
            (
                int(rng.choice(CATEGORIES)),
                rng.uniform(0, w),
                rng.uniform(0, h),
                outline(rng, *rng.uniform(2, 24, 2)),
            )
            for _ in range(int(rng.integers(0, 8)))
        ]
        for category, cx, cy, shape in guesses:
            if rng.random() < 0.1:
                category = int(rng.choice(CATEGORIES))
            size = np.ptp(shape, axis=0)
            jittered = shape * rng.normal(1, 0.1, 2) + size * rng.normal(0, 0.08, 2)
            rle = coco_mask.merge(coco_mask.frPyObjects([placed(jittered, cx, cy)], h, w))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "score": round(float(rng.random()), 3),
                    "bbox": coco_mask.toBbox(rle).tolist(),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    dataset = {
        "images": images,
        "categories": [{"id": c} for c in CATEGORIES],
        "annotations": annotations,
    }
    return dataset, results


def for_iou_type(results: list[dict], iou_type: str) -> list[dict]:
    """Results as each evaluator is given them: boxes, or masks without boxes (so that
    pycocotools takes the mask's area, as detectron2 arranges)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def run_pycocotools(dataset: dict, results: list[dict], iou_type: str) -> np.ndarray:
    ground_truth = COCO()
    ground_truth.dataset = dataset
    ground_truth.createIndex()
    start = time.perf_counter()
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats, time.perf_counter() - start


def load_faster_coco_eval() -> Any | None:
    path = os.environ.get("FCE_PATH", "/tmp/fce")
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)
    try:
        import faster_coco_eval
    except ImportError:
        return None
    return faster_coco_eval


def run_faster_coco_eval(dataset: dict, results: list[dict], iou_type: str):
    fce = load_faster_coco_eval()
    ground_truth = fce.COCO(dataset)
    start = time.perf_counter()
    evaluation = fce.COCOeval_faster(ground_truth, ground_truth.loadRes(results), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return np.asarray(evaluation.stats[:12]), time.perf_counter() - start


def run_segflow(dataset: dict, results: list[dict], iou_type: str):
    sizes = {image["id"]: (image["height"], image["width"]) for image in dataset["images"]}
    per_image: dict[int, tuple[list, list]] = {image_id: ([], []) for image_id in sizes}
    for ann in dataset["annotations"]:
        per_image[ann["image_id"]][0].append(ann)
    for result in results:
        per_image[result["image_id"]][1].append(result)

    start = time.perf_counter()
    workers = [CocoEvaluator(iou_type, CATEGORIES) for _ in range(WORKERS)]
    for i, (image_id, (gts, dts)) in enumerate(per_image.items()):
        height, width = sizes[image_id]
        workers[i % WORKERS].update(image_id, gts, dts, height=height, width=width)
    # As a flow receives them: each worker's state, shipped and rebuilt.
    merged = CocoEvaluator.from_state(workers[0].state())
    for worker in workers[1:]:
        merged.merge(CocoEvaluator.from_state(worker.state()))
    stats = merged.compute().stats
    return stats, time.perf_counter() - start


def timed(label: str, run: Callable[..., tuple[np.ndarray, float]], *args: Any):
    """Run on private copies of the inputs (the evaluators annotate them in place)."""
    with contextlib.redirect_stdout(io.StringIO()):
        stats, seconds = run(*copy.deepcopy(args))
    print(f"  {label:<18} {seconds:8.2f} s")
    return stats, seconds


def compare(label: str, dataset: dict, results: list[dict], fce: Any | None) -> None:
    n_crowd = sum(a["iscrowd"] for a in dataset["annotations"])
    print(
        f"\n{label}: {len(dataset['images'])} images, {len(dataset['annotations'])} "
        f"annotations ({n_crowd} crowd), {len(results)} detections, {len(CATEGORIES)} categories"
    )
    for iou_type in ("bbox", "segm"):
        print(f"{iou_type}:")
        dts = for_iou_type(results, iou_type)
        reference, reference_s = timed("pycocotools", run_pycocotools, dataset, dts, iou_type)
        ours, ours_s = timed("segflow", run_segflow, dataset, dts, iou_type)
        print(
            f"  segflow is {reference_s / ours_s:.1f}x faster than pycocotools; "
            f"max |stat difference| {np.abs(ours - reference).max():.3g}"
        )
        if fce is not None:
            theirs, theirs_s = timed(
                "faster-coco-eval", run_faster_coco_eval, dataset, dts, iou_type
            )
            print(
                f"  segflow is {theirs_s / ours_s:.1f}x faster than faster-coco-eval; its max "
                f"|stat difference| from pycocotools {np.abs(theirs - reference).max():.3g}"
            )
        print("  stats " + " ".join(f"{v:.4f}" for v in reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    fce = load_faster_coco_eval()
    if fce is None:
        print("faster-coco-eval not importable (see the module docstring): skipped")
    compare("sparse", *generate(args.images, copies=(0, 4)), fce)
    # As a detector's top 100: many overlapping guesses per object, all contending.
    compare("dense", *generate(args.images // 10, copies=(10, 30)), fce)


if __name__ == "__main__":
    main()
