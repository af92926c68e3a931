"""Evaluate each image where it is segmented, so evaluation never reads the images again.

A scorer lives in a worker beside the model (:func:`scorer_for` makes the one the model's
task needs). For every image it compares the prediction with the image's ground truth and
keeps the mergeable state the dataset figures are later summed from
(:mod:`segflow.evaluation`), plus a few per-image figures for the ``images`` table. Both
scorers are metrics like the others (:mod:`segflow.metrics`): ``reset / update / merge /
state / compute``, and :meth:`~SemanticScorer.score` (``update`` with the checks of one
image, returning its ``images`` figures) and :meth:`~SemanticScorer.tables` for the shard:

- :class:`SemanticScorer`: per image and class present in the ground truth or the prediction
  (every class, with probabilities), the counts of the ``class_stats`` table — its confusion
  matrix's margins (:class:`~segflow.metrics.semantic.ConfusionMatrix`), Boundary IoU's and
  Trimap IoU's regions (:mod:`segflow.metrics.boundary`), the soft sums, Cityscapes'
  weighted instance sums and category intersections where the ground truth has instance
  files (:mod:`segflow.cityscapes`, as cityscapesScripts' ``evaluatePair``) — and the non-zero
  cells of its confusion matrix (``confusion``). Its figures, per image and over its images,
  are :meth:`~segflow.metrics.figures.ClassSums.figures` of those counts, the reduction
  ``evaluate`` applies to a run;
- :class:`InstanceScorer`: COCOeval's per-image records for ``segm`` and ``bbox``
  (:class:`segflow.metrics.instance.CocoEvaluator`), the ``coco_*`` tables. Detections are
  matched to ground-truth categories by class name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segflow import cityscapes, schema
from segflow.groundtruth import (
    UNLABELLED,
    GroundTruth,
    GroundTruthError,
    InstanceTarget,
    SemanticTarget,
    coco_image_id,
)
from segflow.metrics.boundary import TRIMAP_WIDTH, boundary_region, boundary_width, trimap_band
from segflow.metrics.figures import IMAGE_FIGURES, ClassSums
from segflow.metrics.instance import CocoEvaluator, CocoScores
from segflow.metrics.semantic import ConfusionMatrix
from segflow.prediction import InstancePrediction, Prediction, SemanticPrediction

IMAGE_COLUMNS = ("gt_uri", *IMAGE_FIGURES)
IOU_TYPES = ("segm", "bbox")
METRIC_TABLES = ("class_stats", "confusion", "coco_detections", "coco_ground_truth")
# Classes whose masks are stacked at once: bounds the working memory on large images.
_CLASSES_AT_ONCE = 8


def scorer_for(
    ground_truth: GroundTruth,
    classes: Sequence[str],
    task: str,
    *,
    trimap_width: int = TRIMAP_WIDTH,
) -> SemanticScorer | InstanceScorer:
    """The scorer of a ``task`` model's images against ``ground_truth``; a ground truth of the
    other kind, or one none of whose categories the model has, is a :class:`GroundTruthError`."""
    if ground_truth.kind != task:
        raise GroundTruthError(
            f"ground truth {ground_truth.spec!r} is {ground_truth.kind} but the model is a "
            f"{task} model"
        )
    if task == "semantic":
        return SemanticScorer(classes, trimap_width=trimap_width)
    return InstanceScorer(ground_truth, classes)


def check_size(target: SemanticTarget | InstanceTarget, uri: str, size: tuple[int, int]) -> None:
    """Raise :class:`GroundTruthError` unless ``target`` is ``size`` (height, width)."""
    gt_size = (
        tuple(target.labels.shape)
        if isinstance(target, SemanticTarget)
        else (target.height, target.width)
    )
    if gt_size != size:
        raise GroundTruthError(
            f"{target.source} is {gt_size[1]}x{gt_size[0]} but image {uri} is {size[1]}x{size[0]}"
        )


class _Scorer:
    """What both scorers share: :meth:`score`, one image of a shard."""

    _kinds: tuple[type, type]  # the prediction and target it scores

    def score(
        self,
        image_id: int,
        uri: str,
        prediction: Prediction,
        masks: Sequence[Mapping[str, Any]],
        target: SemanticTarget | InstanceTarget,
    ) -> dict[str, Any]:
        """Evaluate one image (``masks`` are its ``masks`` rows); returns its ``images``
        columns (:data:`IMAGE_COLUMNS`). A target that does not fit the prediction raises
        :class:`GroundTruthError` and leaves the state as it was."""
        prediction_type, target_type = self._kinds
        if not (isinstance(prediction, prediction_type) and isinstance(target, target_type)):
            raise GroundTruthError(
                f"{uri}: a {type(target).__name__} cannot score a {type(prediction).__name__}"
            )
        check_size(target, uri, (prediction.height, prediction.width))
        figures = self._scored(image_id, prediction, masks, target)
        return dict.fromkeys(IMAGE_COLUMNS) | figures | {"gt_uri": target.source}

    def _scored(self, image_id: int, prediction: Any, masks: Any, target: Any) -> dict[str, Any]:
        """``update`` with the image; its figures of :data:`IMAGE_FIGURES`."""
        raise NotImplementedError


class SemanticScorer(_Scorer):
    """``class_stats`` and ``confusion`` rows of the images it scored (see the module
    docstring); Trimap IoU's band is ``trimap_width`` pixels wide."""

    _kinds = (SemanticPrediction, SemanticTarget)

    def __init__(self, classes: Sequence[str], *, trimap_width: int = TRIMAP_WIDTH) -> None:
        if trimap_width < 0:
            raise GroundTruthError(f"the trimap width must be 0 or more pixels, got {trimap_width}")
        self.classes = list(classes)
        self.trimap_width = trimap_width
        self.reset()

    def reset(self) -> None:
        self._class_stats: list[dict[str, np.ndarray]] = []
        self._confusion: list[dict[str, np.ndarray]] = []

    def _scored(
        self, image_id: int, prediction: SemanticPrediction, masks: Any, target: SemanticTarget
    ) -> dict[str, Any]:
        self.update(image_id, prediction, target)
        figures = ClassSums.of_rows(self._class_stats[-1], len(self.classes)).figures()
        return {name: figures[name] for name in IMAGE_FIGURES}

    def update(
        self, image_id: int, prediction: SemanticPrediction, target: SemanticTarget
    ) -> SemanticScorer:
        """Count one image (its labels and ground truth of the same size)."""
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
        confusion = ConfusionMatrix(n).update(truth, labels).state()
        # Unlabelled pixels are no class's ground truth, but what is predicted there counts.
        unlabelled = truth == UNLABELLED
        counted = valid | unlabelled
        gt_pixels = confusion.sum(1)
        pred_pixels = (
            confusion.sum(0) + torch.bincount(labels[unlabelled], minlength=n).cpu().numpy()
        )
        soft = prediction.probabilities
        instance_sums = (
            None
            if target.instances is None
            else _instance_sums(target, truth.cpu().numpy(), labels.cpu().numpy(), n)
        )
        # With probabilities every class has a row: one absent from this image still holds
        # some probability, part of its dataset soft union. A class with instances has one
        # with instance files: its weighted sums are 0, not unknown, where it is absent.
        present = (
            np.arange(n)
            if soft is not None
            else np.flatnonzero(
                gt_pixels
                + pred_pixels
                + (0 if instance_sums is None else ~np.isnan(instance_sums["instance_tp_weighted"]))
            )
        )
        if target.classes is not None:
            present = present[np.isin(present, sorted(target.classes))]
        counts = {
            "gt_pixels": gt_pixels[present],
            "pred_pixels": pred_pixels[present],
            "intersection": confusion.diagonal()[present],
            **self._regions(truth, labels, counted, present),
        }
        counts["union"] = counts["gt_pixels"] + counts["pred_pixels"] - counts["intersection"]
        if soft is not None:
            sums = _soft_sums(soft.to(labels.device, torch.float64)[:, counted], truth[counted])
            counts |= {name: values[present] for name, values in sums.items()}
        if instance_sums is not None:
            counts |= {name: sums[present] for name, sums in instance_sums.items()}
        self._class_stats.append(
            {"image_id": np.full(len(present), image_id), "class_id": present} | counts
        )
        cells = np.argwhere(confusion)
        self._confusion.append(
            {
                "image_id": np.full(len(cells), image_id),
                "gt_class": cells[:, 0],
                "pred_class": cells[:, 1],
                "pixels": confusion[cells[:, 0], cells[:, 1]],
            }
        )
        return self

    def _regions(
        self, truth: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, present: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Boundary IoU's and Trimap IoU's counts of the ``present`` classes over the
        ``valid`` pixels (the counted ones: unlabelled pixels are)."""
        width = boundary_width(*labels.shape)
        sums: dict[str, list[torch.Tensor]] = {
            name: []
            for name in (
                "boundary_intersection",
                "boundary_union",
                "trimap_intersection",
                "trimap_union",
            )
        }
        ids = torch.from_numpy(present).to(labels.device)
        for chunk in ids.split(_CLASSES_AT_ONCE):
            truth_masks = truth == chunk[:, None, None]
            predicted_masks = labels == chunk[:, None, None]
            # Ignored pixels neither make nor hide a ground-truth boundary, and are not counted.
            truth_boundary = boundary_region(truth_masks, width, dont_care=~valid)
            predicted_boundary = boundary_region(predicted_masks, width)
            band = trimap_band(truth_masks, self.trimap_width, valid=valid)
            both, either = truth_masks & predicted_masks, truth_masks | predicted_masks
            for name, pixels in (
                ("boundary_intersection", truth_boundary & predicted_boundary & valid),
                ("boundary_union", (truth_boundary | predicted_boundary) & valid),
                ("trimap_intersection", band & both),
                ("trimap_union", band & either),
            ):
                sums[name].append(pixels.sum((-2, -1)))
        return {
            name: torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)
            for name, parts in sums.items()
        }

    def merge(self, other: SemanticScorer) -> SemanticScorer:
        if other.classes != self.classes:
            raise GroundTruthError("cannot merge the scores of models with different classes")
        self._class_stats += other._class_stats
        self._confusion += other._confusion
        return self

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """The rows of ``class_stats`` and ``confusion`` (their columns but ``run_id`` and
        ``class_name``), as numpy columns."""
        class_stats = _concatenated(
            self._class_stats, ("image_id", "class_id", *schema.CLASS_COUNTS), np.int64
        )
        for column in schema.CLASS_SOFT_SUMS + schema.CLASS_INSTANCE_SUMS:
            # NaN marks a missing sum (not asked for, no instances): null in the table.
            class_stats[column] = np.concatenate(
                [
                    part.get(column, np.full(len(part["image_id"]), np.nan))
                    for part in self._class_stats
                ]
                or [np.zeros(0)]
            )
        confusion = _concatenated(
            self._confusion, ("image_id", "gt_class", "pred_class", "pixels"), np.int64
        )
        return {"class_stats": class_stats, "confusion": confusion}

    def compute(self) -> dict[str, Any]:
        """The figures of the images scored (:meth:`ClassSums.figures`)."""
        return ClassSums.of_rows(self.state()["class_stats"], len(self.classes)).figures()

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        """The shard's metric tables (:data:`METRIC_TABLES`)."""
        state = self.state()
        class_stats = state["class_stats"]
        class_stats["class_name"] = np.array(self.classes, dtype=object)[class_stats["class_id"]]
        return _empty_tables() | {
            "class_stats": _table("class_stats", run_id, class_stats),
            "confusion": _table("confusion", run_id, state["confusion"]),
        }


def _instance_sums(
    target: SemanticTarget, truth: np.ndarray, labels: np.ndarray, n: int
) -> dict[str, np.ndarray]:
    """Per class, the Cityscapes instance and category sums of ``class_stats`` (see
    :mod:`segflow.schema`), as cityscapesScripts' ``evaluatePair`` counts them; NaN for the
    classes without instances' weighted sums."""
    if n != len(cityscapes.TRAIN_IDS):
        raise GroundTruthError(
            f"{target.source}: Cityscapes instances are scored for a model of its "
            f"{len(cityscapes.TRAIN_IDS)} classes (train ids), and this one has {n}"
        )
    category = np.empty(n, np.int64)
    for index, members in enumerate(cityscapes.CATEGORIES.values()):
        category[list(members)] = index
    valid = truth >= 0
    same = valid & (category[np.where(valid, truth, 0)] == category[labels])
    sums = {"category_intersection": np.bincount(truth[same], minlength=n).astype(np.float64)}
    weighted = ("instance_tp_weighted", "instance_fn_weighted")
    weighted += ("category_tp_weighted", "category_fn_weighted")
    for name in weighted:
        sums[name] = np.full(n, np.nan)
        sums[name][list(cityscapes.AVERAGE_INSTANCE_SIZE)] = 0.0
    # One pass over the instance pixels, not one per instance (Cityscapes frames hold dozens).
    inside = target.instances.ids > 0
    instances, pixel_instance = np.unique(target.instances.ids[inside], return_inverse=True)
    classes = np.array([target.instances.classes[i] for i in instances.tolist()], np.int64)
    predicted, pixel_class = labels[inside], classes[pixel_instance]
    count = len(instances)
    size = np.bincount(pixel_instance, minlength=count)
    hits = np.bincount(pixel_instance, predicted == pixel_class, count)
    category_hits = np.bincount(pixel_instance, category[predicted] == category[pixel_class], count)
    # Every instance has a pixel; its class has an average size unless the instance file
    # names an instance of a class that has none in Cityscapes' table, which is not scored.
    sizes = np.array([cityscapes.AVERAGE_INSTANCE_SIZE.get(c, np.nan) for c in classes.tolist()])
    weight = sizes / size
    scored = ~np.isnan(weight)
    for name, pixels in zip(
        weighted, (hits, size - hits, category_hits, size - category_hits), strict=True
    ):
        np.add.at(sums[name], classes[scored], (pixels * weight)[scored])
    return sums


def _soft_sums(soft: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    """Per class, from the probabilities ``(C, pixels)`` of the counted pixels and their
    ground truth (UNLABELLED: no class): the soft intersection and the soft unions of both
    forms (:mod:`segflow.metrics.figures`)."""
    n = soft.shape[0]
    labelled = truth >= 0
    truth = truth[labelled]
    on_truth = soft[:, labelled].gather(0, truth[None]).flatten()
    intersection = torch.zeros(n, dtype=torch.float64, device=soft.device).index_add_(
        0, truth, on_truth
    )
    gt_pixels = torch.bincount(truth, minlength=n).double()
    return {
        "soft_intersection": intersection.cpu().numpy(),
        "soft_union": (soft.sum(1) + gt_pixels - intersection).cpu().numpy(),
        # The ground truth is 0 or 1, so its squared L2 norm is its pixel count.
        "soft_squared_union": (soft.square().sum(1) + gt_pixels - intersection).cpu().numpy(),
    }


class InstanceScorer(_Scorer):
    """COCOeval's per-image records, per IoU type, of the images it scored."""

    _kinds = (InstancePrediction, InstanceTarget)

    def __init__(self, ground_truth: GroundTruth, classes: Sequence[str]) -> None:
        self.classes = list(classes)
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
        # COCOeval pools detections of equal score in the ground truth's image id order: the
        # evaluators are keyed by that id, mapped back to segflow's for the tables.
        self._image_id_of: dict[int, int] = {}
        self._evaluators = {
            iou_type: CocoEvaluator(iou_type, sorted(self.category_of.values()))
            for iou_type in IOU_TYPES
        }

    def _scored(
        self,
        image_id: int,
        prediction: InstancePrediction,
        masks: Sequence[Mapping[str, Any]],
        target: InstanceTarget,
    ) -> dict[str, Any]:
        self.update(image_id, masks, target)
        return {}  # instance models have no per-image figures

    def update(
        self, image_id: int, masks: Sequence[Mapping[str, Any]], target: InstanceTarget
    ) -> InstanceScorer:
        """Evaluate one image's ``masks`` rows; an image that either IoU type cannot evaluate
        raises and leaves the state as it was."""
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
        return self

    def merge(self, other: InstanceScorer) -> InstanceScorer:
        for iou_type, evaluator in self._evaluators.items():
            evaluator.merge(other._evaluators[iou_type])  # refuses images scored twice
        self._image_id_of |= other._image_id_of
        return self

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """The rows of ``coco_detections`` and ``coco_ground_truth`` (their columns but
        ``run_id``), as numpy columns."""
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
            "coco_detections": _merged(coco["detections"]),
            "coco_ground_truth": _merged(coco["ground_truth"]),
        }

    def compute(self) -> dict[str, CocoScores]:
        """COCO mAP of the images scored, per IoU type."""
        return {
            iou_type: CocoEvaluator.from_state(evaluator.state()).compute()
            for iou_type, evaluator in self._evaluators.items()
        }

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        """The shard's metric tables (:data:`METRIC_TABLES`)."""
        state = self.state()
        return _empty_tables() | {
            name: _table(name, run_id, columns) for name, columns in state.items()
        }


def _concatenated(parts: list[dict[str, np.ndarray]], columns: Sequence[str], dtype) -> dict:
    return {
        column: np.concatenate([part[column] for part in parts]).astype(dtype)
        if parts
        else np.zeros(0, dtype)
        for column in columns
    }


def _merged(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    return (
        {column: np.concatenate([part[column] for part in parts]) for column in parts[0]}
        if parts
        else None
    )


def _empty_tables() -> dict[str, pa.Table]:
    return {name: schema.TABLES[name].empty_table() for name in METRIC_TABLES}


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
