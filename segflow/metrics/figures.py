"""The figures segflow reports, named once, and the one reduction of summed counts to them.

Every semantic figure is a ratio of sums of ``class_stats`` columns (:mod:`segflow.schema`)
over a set of images: one image for its ``images`` row, a shard in a worker, any selection
of a run in ``evaluate``. :meth:`ClassSums.figures` is that reduction, for all of them. Per
class (G ground-truth pixels, P predicted pixels, I their intersection, U = G + P - I):

==================  ===========================================================
miou                I / U, meaned over the classes with U > 0
pixel_accuracy      ΣI / ΣG over all classes
mean_accuracy       I / G, meaned over the classes with G > 0
fwiou               Σ (G / ΣG) · I / U over the classes with U > 0
mdice               2I / (G + P)
boundary_iou        boundary_intersection / boundary_union (Boundary IoU)
trimap_miou         trimap_intersection / trimap_union (Trimap IoU)
soft_miou           soft_intersection / soft_union: L1 norms, Σ_Y p / (‖P‖₁ + ‖Y‖₁ − Σ_Y p)
soft_mdice          2 soft_intersection / (soft_union + soft_intersection)
soft_miou_squared   soft_intersection / soft_squared_union: squared L2 norms,
                    Σ_Y p / (‖P‖₂² + ‖Y‖₂² − Σ_Y p)
soft_mdice_squared  2 soft_intersection / (soft_squared_union + soft_intersection)
iiou                instance-level IoU, as cityscapesScripts computes it: per class with
                    instances, TPw / (TPw + FP + FNw), TPw and FNw the weighted sums
                    instance_tp_weighted and instance_fn_weighted, FP = P − I
category_miou       the mean over the categories K of Cityscapes (the classes being its
                    train ids) of category IoU, TP_K / (ΣG + ΣP − TP_K) over the classes
                    of K, TP_K = Σ category_intersection
category_miiou      the mean over the categories with instances of TPw_K / (TPw_K +
                    FP_K + FNw_K), FP_K = ΣP − TP_K, TPw_K and FNw_K the sums of
                    category_tp_weighted and category_fn_weighted
==================  ===========================================================

Every mean is over the classes whose denominator is positive; a class without one is
undefined (``None``), not 0, and a mean over no class is undefined. The soft figures exist
only for runs asked for them (``--soft-metrics``), the instance and category ones for runs
with Cityscapes instance files (``masks:`` option ``instances=``); the per-category values
are in ``category_iou`` and ``category_iiou``, by category name. The integer figures are
exact: the same images give the same floats whatever shards they were scored in and in
whatever order the sums were taken (the weighted instance sums, floats, to rounding).

:data:`SEMANTIC_FIGURES` names the dataset figures, with the label people read and the key
of their per-class values in ``evaluate``'s result; :data:`IMAGE_FIGURES` those that each
image's ``images`` row holds too. The CLI, the report, the demo and the regression tracking
all list the figures from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from segflow import cityscapes, schema


@dataclass(frozen=True)
class Figure:
    """One dataset figure: its key in ``evaluate``'s result, its label, and the key and label
    of its per-class values (``None``: it has none)."""

    name: str
    label: str
    per_class: str | None = None
    class_label: str | None = None

    def format(self, value: float | None, digits: int) -> str:
        return format_figure(value, digits)


def format_figure(value: float | None, digits: int) -> str:
    """A figure as people read it: ``digits`` decimals, or ``undefined``."""
    return "undefined" if value is None else f"{value:.{digits}f}"


SEMANTIC_FIGURES: tuple[Figure, ...] = (
    Figure("miou", "mIoU", "per_class_iou", "IoU"),
    Figure("pixel_accuracy", "pixel accuracy"),
    Figure("mean_accuracy", "mean class accuracy"),
    Figure("fwiou", "frequency-weighted IoU"),
    Figure("mdice", "mDice"),
    Figure("boundary_iou", "Boundary IoU", "per_class_boundary_iou", "Boundary IoU"),
    Figure("trimap_miou", "Trimap mIoU", "per_class_trimap_iou", "Trimap IoU"),
    Figure("soft_miou", "soft mIoU (L1)", "per_class_soft_iou", "soft IoU (L1)"),
    Figure("soft_mdice", "soft mDice (L1)"),
    Figure(
        "soft_miou_squared",
        "soft mIoU (squared L2)",
        "per_class_soft_iou_squared",
        "soft IoU (squared L2)",
    ),
    Figure("soft_mdice_squared", "soft mDice (squared L2)"),
    Figure("iiou", "iIoU", "per_class_iiou", "iIoU"),
    Figure("category_miou", "category mIoU"),
    Figure("category_miiou", "category iIoU"),
)
IMAGE_FIGURES = ("pixel_accuracy", "miou", "mdice", "boundary_iou")


def figures_in(semantic: Mapping[str, Any]) -> tuple[Figure, ...]:
    """The figures of :data:`SEMANTIC_FIGURES` that an ``evaluate`` result holds (the soft
    ones only where the run computed them)."""
    return tuple(figure for figure in SEMANTIC_FIGURES if figure.name in semantic)


@dataclass(frozen=True)
class SemanticScores:
    """Dataset figures. A class absent from both ground truth and predictions has IoU NaN
    (undefined) and is left out of the means."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    fwiou: float
    mdice: float
    per_class_iou: np.ndarray  # (C,) float64, NaN where undefined

    @classmethod
    def from_counts(
        cls, gt_pixels: np.ndarray, predicted_pixels: np.ndarray, true_positive: np.ndarray
    ) -> SemanticScores:
        """The figures from per-class integer sums (ground-truth pixels, predicted pixels and
        their intersection), which is all a confusion matrix contributes to them."""
        gt_pixels, predicted_pixels, true_positive = (
            np.asarray(a, dtype=np.int64) for a in (gt_pixels, predicted_pixels, true_positive)
        )
        union = gt_pixels + predicted_pixels - true_positive
        total = gt_pixels.sum()
        iou = ratios(true_positive, union)
        dice = ratios(2 * true_positive, gt_pixels + predicted_pixels)
        class_accuracy = ratios(true_positive, gt_pixels)
        frequency = gt_pixels / total if total else np.zeros_like(iou)
        defined = ~np.isnan(iou)
        return cls(
            miou=_mean(iou),
            pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
            mean_accuracy=_mean(class_accuracy),
            fwiou=float((frequency[defined] * iou[defined]).sum()) if total else float("nan"),
            mdice=_mean(dice),
            per_class_iou=iou,
        )


@dataclass(frozen=True)
class ClassSums:
    """Per-class sums of ``class_stats``' columns over a set of images, each ``(C,)``:
    integers, and the soft sums (float) where the run has them."""

    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    intersection: np.ndarray
    boundary_intersection: np.ndarray
    boundary_union: np.ndarray
    trimap_intersection: np.ndarray
    trimap_union: np.ndarray
    soft_intersection: np.ndarray | None = None
    soft_union: np.ndarray | None = None
    soft_squared_union: np.ndarray | None = None
    # Cityscapes' instance and category sums: NaN for a class no row has them for.
    instance_tp_weighted: np.ndarray | None = None
    instance_fn_weighted: np.ndarray | None = None
    category_intersection: np.ndarray | None = None
    category_tp_weighted: np.ndarray | None = None
    category_fn_weighted: np.ndarray | None = None

    @classmethod
    def of_rows(cls, rows: Mapping[str, np.ndarray], num_classes: int) -> ClassSums:
        """The sums of ``class_stats`` rows (columns by name, ``class_id`` among them; rows of
        one class may repeat). The soft sums are kept when every row has them; the instance
        sums when some row has them, summed over the rows that have them."""
        class_ids = np.asarray(rows["class_id"], np.int64)
        sums: dict[str, np.ndarray | None] = {}
        for name in INTEGER_SUMS:
            total = np.zeros(num_classes, np.int64)
            np.add.at(total, class_ids, np.asarray(rows[name], np.int64))
            sums[name] = total
        for name in SOFT_SUMS:
            values = rows.get(name)
            values = None if values is None else np.asarray(values, np.float64)
            if values is None or not len(values) or np.isnan(values).any():
                sums[name] = None
                continue
            total = np.zeros(num_classes, np.float64)
            np.add.at(total, class_ids, values)
            sums[name] = total
        for name in INSTANCE_SUMS:
            values = rows.get(name)
            values = None if values is None else np.asarray(values, np.float64)
            if values is None or np.isnan(values).all():
                sums[name] = None
                continue
            known = ~np.isnan(values)
            total = np.zeros(num_classes, np.float64)
            np.add.at(total, class_ids[known], values[known])
            had = np.zeros(num_classes, bool)
            had[class_ids[known]] = True
            sums[name] = np.where(had, total, np.nan)
        return cls(**sums)

    def figures(self) -> dict[str, Any]:
        """The figures of :data:`SEMANTIC_FIGURES` and their per-class values, JSON-ready
        (``None`` where undefined)."""
        scores = SemanticScores.from_counts(self.gt_pixels, self.pred_pixels, self.intersection)
        boundary = ratios(self.boundary_intersection, self.boundary_union)
        trimap = ratios(self.trimap_intersection, self.trimap_union)
        result: dict[str, Any] = {
            "miou": _number(scores.miou),
            "pixel_accuracy": _number(scores.pixel_accuracy),
            "mean_accuracy": _number(scores.mean_accuracy),
            "fwiou": _number(scores.fwiou),
            "mdice": _number(scores.mdice),
            "boundary_iou": _number(_mean(boundary)),
            "trimap_miou": _number(_mean(trimap)),
            "per_class_iou": _numbers(scores.per_class_iou),
            "per_class_boundary_iou": _numbers(boundary),
            "per_class_trimap_iou": _numbers(trimap),
        } | self._instance_figures()
        if self.soft_intersection is None:
            return result
        for suffix, union in (("", self.soft_union), ("_squared", self.soft_squared_union)):
            if union is None:
                continue
            iou = ratios(self.soft_intersection, union)
            dice = ratios(2 * self.soft_intersection, union + self.soft_intersection)
            result |= {
                f"soft_miou{suffix}": _number(_mean(iou)),
                f"soft_mdice{suffix}": _number(_mean(dice)),
                f"per_class_soft_iou{suffix}": _numbers(iou),
            }
        return result

    def _instance_figures(self) -> dict[str, Any]:
        """Cityscapes' iIoU and category figures (cityscapesScripts'
        ``getInstanceIouScoreForLabel`` and ``get*ScoreForCategory``), where the sums exist."""
        if self.instance_tp_weighted is None or self.category_intersection is None:
            return {}
        false_positive = self.pred_pixels - self.intersection
        iiou = ratios(
            self.instance_tp_weighted,
            self.instance_tp_weighted + self.instance_fn_weighted + false_positive,
        )
        category_iou, category_iiou = {}, {}
        for category, members in cityscapes.CATEGORIES.items():
            ids = list(members)
            true_positive = np.nansum(self.category_intersection[ids])
            gt, predicted = self.gt_pixels[ids].sum(), self.pred_pixels[ids].sum()
            category_iou[category] = ratios(true_positive, gt + predicted - true_positive)
            if category in cityscapes.INSTANCE_CATEGORIES:
                tp, fn = (
                    np.nansum(sums[ids])
                    for sums in (self.category_tp_weighted, self.category_fn_weighted)
                )
                category_iiou[category] = ratios(tp, tp + fn + predicted - true_positive)
        return {
            "iiou": _number(_mean(iiou)),
            "per_class_iiou": _numbers(iiou),
            "category_miou": _number(_mean(np.array(list(category_iou.values())))),
            "category_miiou": _number(_mean(np.array(list(category_iiou.values())))),
            "category_iou": {k: _number(v) for k, v in category_iou.items()},
            "category_iiou": {k: _number(v) for k, v in category_iiou.items()},
        }


SOFT_SUMS = schema.CLASS_SOFT_SUMS
INSTANCE_SUMS = schema.CLASS_INSTANCE_SUMS
INTEGER_SUMS = tuple(
    field for field in ClassSums.__dataclass_fields__ if field not in SOFT_SUMS + INSTANCE_SUMS
)


def ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` elementwise, NaN where the denominator is not positive."""
    numerator, denominator = np.asarray(numerator), np.asarray(denominator)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined figure is ``None``."""
    return None if np.isnan(value) else float(value)


def _numbers(values: np.ndarray) -> list[float | None]:
    return [_number(v) for v in values]
