"""COCO results files: scored with segflow's COCO evaluator, and made from a run's masks.

A COCO results file is what ``pycocotools.coco.COCO.loadRes`` reads: a JSON list of
``{"image_id", "category_id", "score", "bbox" and/or "segmentation"}``, ids those of the
ground truth it is scored against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from segflow.groundtruth import CocoDataset, read_coco, read_json
from segflow.metrics.instance import CocoEvalError, CocoEvaluator, CocoScores, IouType

__all__ = ["coco_results_from_masks", "evaluate_coco_results"]

_MASK_COLUMNS = (
    "image_id",
    "instance",
    "class_id",
    "class_name",
    "score",
    "bbox",
    "counts",
    "height",
    "width",
)


def evaluate_coco_results(gt: str, results: str, iou_type: IouType) -> CocoScores:
    """COCOeval's figures for the results file at URI ``results`` against the COCO instances
    JSON at URI ``gt``, every ground-truth image evaluated (with or without detections).

    The results are checked as ``loadRes`` checks them: a list, every image id one of the
    ground truth's, and every result has a ``bbox`` or none has (loadRes picks one rule for
    all from the first result). With ``"segm"`` every result needs a ``segmentation``; a
    result's ``bbox``, when the file has them, gives its area, as loadRes does. The figures are
    then COCOeval's on the same results, to the last bit. An empty list scores 0 where there is
    ground truth (loadRes refuses it).
    """
    dataset = read_coco(gt)
    if not dataset.categories:
        raise CocoEvalError(f"COCO ground truth {gt!r} lists no categories")
    results_list = read_json(results, "COCO results", CocoEvalError)
    per_image = _detections_by_image(results_list, dataset, iou_type)
    evaluator = CocoEvaluator(iou_type, list(dataset.categories))
    for image_id, image in dataset.images.items():
        evaluator.update(
            image_id,
            dataset.annotations.get(image_id, []),
            per_image.get(image_id, []),
            height=image["height"],
            width=image["width"],
        )
    return evaluator.compute()


def _detections_by_image(
    results: Any, dataset: CocoDataset, iou_type: IouType
) -> dict[int, list[Mapping[str, Any]]]:
    """Each image's results, as CocoEvaluator must see them to score as COCOeval after
    loadRes (see evaluate_coco_results)."""
    label = f"COCO results scored against {dataset.uri!r}"
    if not isinstance(results, list):
        raise CocoEvalError(f"{label} must be a JSON list of results, got {type(results).__name__}")
    boxed = bool(results) and _has_box(results[0])
    by_image = defaultdict(list)
    for i, result in enumerate(results):
        where = f"{label}: result {i}"
        if not isinstance(result, dict):
            raise CocoEvalError(f"{where} is not an object")
        image_id = result.get("image_id")
        if isinstance(image_id, bool) or image_id not in dataset.images:
            raise CocoEvalError(
                f"{where} is for image {image_id!r}, which the ground truth does not list"
            )
        if _has_box(result) != boxed:
            raise CocoEvalError(
                f"{where} {'lacks' if boxed else 'has'} a 'bbox' and result 0 does not: every "
                "result has one or none has (pycocotools' loadRes follows result 0)"
            )
        if iou_type == "segm" and "segmentation" not in result:
            raise CocoEvalError(f"{where} has no 'segmentation' to evaluate as 'segm'")
        if not boxed:
            result = {key: value for key, value in result.items() if key != "bbox"}
        by_image[image_id].append(result)
    return by_image


def _has_box(result: Any) -> bool:
    return isinstance(result, dict) and result.get("bbox", []) != []


def coco_results_from_masks(
    masks: pa.Table,
    *,
    image_ids: Mapping[int, int] | None = None,
    category_ids: Mapping[str, int] | None = None,
) -> list[dict]:
    """COCO results (as loadRes reads them) from the instance rows of a run's ``masks`` table.

    Each row gives ``image_id``, ``category_id``, ``score``, its detector's ``bbox`` and its
    mask as a compressed RLE ``{"size": [h, w], "counts": str}``. ``image_ids`` maps segflow
    image ids to the ground truth's, ``category_ids`` class names to its category ids; without
    them the row's ``image_id`` and ``class_id`` are kept. Rows of semantic models (no
    ``instance``) are refused: COCO results are detections.
    """
    missing = [c for c in _MASK_COLUMNS if c not in masks.column_names]
    if missing:
        raise CocoEvalError(f"masks table lacks column(s) {missing} (see segflow.schema)")
    semantic = masks.column("instance").null_count
    if semantic:
        raise CocoEvalError(
            f"masks table has {semantic} semantic row(s) (instance is null): COCO results are "
            "instance detections, from an instance model's run"
        )
    if masks.column("score").null_count:
        raise CocoEvalError("masks table has detections without a score")
    _check_mapped(masks, "image_id", image_ids, "image_ids")
    _check_mapped(masks, "class_name", category_ids, "category_ids")
    return [
        {
            "image_id": row["image_id"] if image_ids is None else image_ids[row["image_id"]],
            "category_id": (
                row["class_id"] if category_ids is None else category_ids[row["class_name"]]
            ),
            "score": row["score"],
            "bbox": row["bbox"],
            "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
        }
        for row in masks.select(list(_MASK_COLUMNS)).to_pylist()
    ]


def _check_mapped(masks: pa.Table, column: str, mapping: Mapping | None, name: str) -> None:
    if mapping is None:
        return
    unmapped = [v for v in pc.unique(masks.column(column)).to_pylist() if v not in mapping]
    if unmapped:
        raise CocoEvalError(
            f"{name} has no entry for {len(unmapped)} {column}(s) of the masks table, e.g. "
            f"{sorted(unmapped)[:5]}"
        )
