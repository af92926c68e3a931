"""Evaluate each image where it is segmented, so evaluation never reads the images again.

An :class:`ImageScorer` lives in a worker beside the model. For every image it compares the
prediction with the image's ground truth and keeps the mergeable integer state the dataset
figures are later summed from (:mod:`segflow.evaluation`), plus a few per-image figures for
the ``images`` table:

- semantic models: per class present in the ground truth or the prediction, the pixel counts
  of the ``class_stats`` table, boundary-region counts included (Boundary IoU);
- instance models: COCOeval's per-image records for ``segm`` and ``bbox``
  (:class:`segflow.metrics.instance.CocoEvaluator`), the ``coco_*`` tables. Detections are
  matched to ground-truth categories by class name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segflow import schema
from segflow.groundtruth import (
    GroundTruth,
    GroundTruthError,
    InstanceTarget,
    SemanticTarget,
    coco_image_id,
)
from segflow.metrics.boundary import boundary_region, boundary_width
from segflow.metrics.instance import CocoEvaluator
from segflow.prediction import InstancePrediction, Prediction, SemanticPrediction

IMAGE_COLUMNS = ("gt_uri", "pixel_accuracy", "miou", "mdice", "boundary_iou")
IOU_TYPES = ("segm", "bbox")
METRIC_TABLES = ("class_stats", "confusion", "coco_detections", "coco_ground_truth")


class ImageScorer:
    """Scores the images of one shard (or any set of images) against ``ground_truth``."""

    def __init__(self, ground_truth: GroundTruth, classes: Sequence[str], task: str) -> None:
        if ground_truth.kind != task:
            raise GroundTruthError(
                f"ground truth {ground_truth.spec!r} is {ground_truth.kind} but the model is a "
                f"{task} model"
            )
        self.ground_truth = ground_truth
        self.classes = list(classes)
        self.category_of: dict[str, int] = {}
        if task == "instance":
            categories = ground_truth.categories or {}
            self.category_of = {
                name: category for category, name in categories.items() if name in self.classes
            }
            if not self.category_of:
                raise GroundTruthError(
                    f"none of the categories of {ground_truth.spec!r} "
                    f"({sorted(categories.values())[:5]}...) is a class of the model "
                    f"({self.classes[:5]}...): detections are matched to categories by name"
                )
        self.reset()

    def reset(self) -> None:
        self._class_stats: list[dict[str, np.ndarray]] = []
        self._confusion: list[dict[str, np.ndarray]] = []
        # COCOeval pools detections of equal score in the ground truth's image id order: the
        # evaluators are keyed by that id, mapped back to segflow's for the tables.
        self._image_id_of: dict[int, int] = {}
        self._evaluators = (
            {
                iou_type: CocoEvaluator(iou_type, sorted(self.category_of.values()))
                for iou_type in IOU_TYPES
            }
            if self.category_of
            else {}
        )

    def score(
        self,
        image_id: int,
        uri: str,
        prediction: Prediction,
        masks: Sequence[Mapping[str, Any]],
        target: SemanticTarget | InstanceTarget,
    ) -> dict[str, Any]:
        """Evaluate one image (``masks`` are its ``masks`` rows); returns its ``images``
        columns. A target that does not fit the prediction raises :class:`GroundTruthError`
        and leaves the state as it was."""
        size = (prediction.height, prediction.width)
        if isinstance(prediction, SemanticPrediction) and isinstance(target, SemanticTarget):
            if tuple(target.labels.shape) != size:
                raise _size_mismatch(target.source, tuple(target.labels.shape), uri, size)
            figures = self._score_semantic(image_id, prediction, target)
        elif isinstance(prediction, InstancePrediction) and isinstance(target, InstanceTarget):
            if (target.height, target.width) != size:
                raise _size_mismatch(target.source, (target.height, target.width), uri, size)
            self._score_instances(image_id, masks, target)
            figures = {}
        else:
            raise GroundTruthError(
                f"{uri}: a {type(target).__name__} cannot score a {type(prediction).__name__}"
            )
        return {name: figures.get(name) for name in IMAGE_COLUMNS} | {"gt_uri": target.source}

    def _score_semantic(
        self, image_id: int, prediction: SemanticPrediction, target: SemanticTarget
    ) -> dict[str, float | None]:
        labels = prediction.labels
        n = len(self.classes)
        truth = torch.from_numpy(np.asarray(target.labels, dtype=np.int64)).to(labels.device)
        valid = truth >= 0
        unknown = truth[valid & (truth >= n)]
        if unknown.numel():
            raise GroundTruthError(
                f"{target.source}: holds class ids {sorted(set(unknown.unique().tolist()))[:10]} "
                f"but the model has {n} classes; ignore them (--ignore-index) or map them "
                "(an id_map)"
            )
        confusion = torch.bincount(truth[valid] * n + labels[valid], minlength=n * n).view(n, n)
        gt_pixels, pred_pixels = confusion.sum(1), confusion.sum(0)
        intersection = confusion.diagonal()
        soft = prediction.probabilities
        # With probabilities every class has a row: one absent from this image still holds
        # some probability, part of its dataset soft union.
        present = (
            torch.arange(n, device=labels.device)
            if soft is not None
            else torch.nonzero(gt_pixels + pred_pixels).flatten()
        )
        width = boundary_width(*labels.shape)
        boundary = np.zeros((2, len(present)), np.int64)
        for i, class_id in enumerate(present.tolist()):
            # Ignored pixels neither make nor hide a ground-truth boundary, and are not counted.
            truth_boundary = boundary_region(truth == class_id, width, dont_care=~valid)
            predicted_boundary = boundary_region(labels == class_id, width)
            boundary[0, i] = (truth_boundary & predicted_boundary & valid).sum()
            boundary[1, i] = ((truth_boundary | predicted_boundary) & valid).sum()
        counts = {
            "gt_pixels": gt_pixels[present].cpu().numpy(),
            "pred_pixels": pred_pixels[present].cpu().numpy(),
            "intersection": intersection[present].cpu().numpy(),
            "boundary_intersection": boundary[0],
            "boundary_union": boundary[1],
        }
        counts["union"] = counts["gt_pixels"] + counts["pred_pixels"] - counts["intersection"]
        if soft is not None:
            soft = soft.to(labels.device, torch.float64)[:, valid]  # (C, evaluated pixels)
            soft_intersection = soft.gather(0, truth[valid][None]).flatten()
            soft_intersection = torch.zeros(n, dtype=torch.float64, device=soft.device).index_add_(
                0, truth[valid], soft_intersection
            )
            counts["soft_intersection"] = soft_intersection.cpu().numpy()
            counts["soft_union"] = (
                (soft.sum(1) + gt_pixels.double() - soft_intersection).cpu().numpy()
            )
        self._class_stats.append(
            {"image_id": np.full(len(present), image_id), "class_id": present.cpu().numpy()}
            | counts
        )
        cells = torch.nonzero(confusion).cpu().numpy()
        self._confusion.append(
            {
                "image_id": np.full(len(cells), image_id),
                "gt_class": cells[:, 0],
                "pred_class": cells[:, 1],
                "pixels": confusion[cells[:, 0], cells[:, 1]].cpu().numpy(),
            }
        )
        return _image_figures(counts)

    def _score_instances(
        self, image_id: int, masks: Sequence[Mapping[str, Any]], target: InstanceTarget
    ) -> None:
        detections = [
            {
                "category_id": self.category_of[row["class_name"]],
                "score": row["score"],
                "bbox": row["bbox"],
                "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
            }
            for row in masks
            if row["class_name"] in self.category_of
        ]
        # A segm detection with a box would get the box's area (loadRes's rule); the mask's
        # is the one that means something here.
        without_boxes = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        gt_image_id = coco_image_id(target.source)
        if gt_image_id in self._image_id_of:
            raise GroundTruthError(
                f"{target.source}: already the ground truth of another image of this shard"
            )
        # Evaluated on its own first, so that an annotation one IoU type cannot use leaves
        # neither evaluator holding the image.
        this_image = {
            iou_type: CocoEvaluator(iou_type, evaluator.categories).update(
                gt_image_id,
                target.annotations,
                without_boxes if iou_type == "segm" else detections,
                height=target.height,
                width=target.width,
            )
            for iou_type, evaluator in self._evaluators.items()
        }
        for iou_type, evaluator in self._evaluators.items():
            evaluator.merge(this_image[iou_type])
        self._image_id_of[gt_image_id] = image_id

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        """The shard's metric tables (:data:`METRIC_TABLES`)."""
        class_stats = _concatenated(
            self._class_stats, ("image_id", "class_id", *schema.CLASS_COUNTS)
        )
        for column in schema.CLASS_SOFT_SUMS:
            class_stats[column] = np.concatenate(
                [
                    part.get(column, np.full(len(part["image_id"]), np.nan))
                    for part in self._class_stats
                ]
                or [np.zeros(0)]
            )
        confusion = _concatenated(self._confusion, ("image_id", "gt_class", "pred_class", "pixels"))
        class_stats["class_name"] = np.array(self.classes, dtype=object)[class_stats["class_id"]]
        coco: dict[str, list[dict[str, np.ndarray]]] = {"detections": [], "ground_truth": []}
        for iou_type, evaluator in self._evaluators.items():
            state = evaluator.state()
            for name in coco:
                rows = dict(state[name])
                rows["gt_image_id"] = rows["image_id"]
                rows["image_id"] = np.array(
                    [self._image_id_of[i] for i in rows["gt_image_id"].tolist()], np.int64
                )
                rows["iou_type"] = np.full(len(rows["image_id"]), iou_type, dtype=object)
                coco[name].append(rows)
        return {
            "class_stats": _table("class_stats", run_id, class_stats),
            "confusion": _table("confusion", run_id, confusion),
            "coco_detections": _table("coco_detections", run_id, _merged(coco["detections"])),
            "coco_ground_truth": _table("coco_ground_truth", run_id, _merged(coco["ground_truth"])),
        }


def _image_figures(counts: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    evaluated = int(counts["gt_pixels"].sum())
    union = counts["union"]
    boundary_union = counts["boundary_union"]
    return {
        "pixel_accuracy": int(counts["intersection"].sum()) / evaluated if evaluated else None,
        "miou": _mean_ratio(counts["intersection"], union),
        "mdice": _mean_ratio(2 * counts["intersection"], union + counts["intersection"]),
        "boundary_iou": _mean_ratio(counts["boundary_intersection"], boundary_union),
    }


def _mean_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float | None:
    defined = denominator > 0
    return float(np.mean(numerator[defined] / denominator[defined])) if defined.any() else None


def _size_mismatch(source: str, gt_size: tuple, uri: str, size: tuple) -> GroundTruthError:
    return GroundTruthError(
        f"{source} is {gt_size[1]}x{gt_size[0]} but image {uri} is {size[1]}x{size[0]}"
    )


def _concatenated(parts: list[dict[str, np.ndarray]], columns: Sequence[str]) -> dict:
    return {
        column: np.concatenate([part[column] for part in parts]).astype(np.int64)
        if parts
        else np.zeros(0, np.int64)
        for column in columns
    }


def _merged(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    return (
        {column: np.concatenate([part[column] for part in parts]) for column in parts[0]}
        if parts
        else None
    )


def _table(name: str, run_id: str, columns: dict[str, np.ndarray] | None) -> pa.Table:
    table_schema = schema.TABLES[name]
    if columns is None or not len(columns["image_id"]):
        return table_schema.empty_table()
    rows = len(columns["image_id"])
    columns = {"run_id": np.full(rows, run_id, dtype=object), **columns}
    return pa.table(
        # NaN marks a missing float (soft metrics not asked for): null in the table.
        [
            pa.array(columns[field.name], type=field.type, from_pandas=True)
            for field in table_schema
        ],
        schema=table_schema,
    )
