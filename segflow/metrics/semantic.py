"""Dataset-level semantic segmentation metrics from one integer confusion matrix.

mIoU is computed from the summed matrix (as torchvision's reference ``ConfusionMatrix`` and
the Cityscapes/VOC benchmarks do), never as a mean of per-image IoUs: the two differ whenever
images differ in size or class frequency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


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
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
            dice = np.where(union > 0, 2 * true_positive / (gt_pixels + predicted_pixels), np.nan)
            class_accuracy = np.where(gt_pixels > 0, true_positive / gt_pixels, np.nan)
            frequency = gt_pixels / total if total else np.zeros_like(iou)
        defined = ~np.isnan(iou)
        return cls(
            miou=float(np.nanmean(iou)) if defined.any() else float("nan"),
            pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
            mean_accuracy=float(np.nanmean(class_accuracy))
            if (gt_pixels > 0).any()
            else float("nan"),
            fwiou=float((frequency[defined] * iou[defined]).sum()) if total else float("nan"),
            mdice=float(np.nanmean(dice)) if defined.any() else float("nan"),
            per_class_iou=iou,
        )


class ConfusionMatrix:
    """``matrix[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``.

    Ground-truth pixels equal to ``ignore_index`` (or outside ``[0, num_classes)``) are not
    counted. Predictions outside ``[0, num_classes)`` are a caller bug and raise.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, target: np.ndarray | torch.Tensor, prediction: np.ndarray | torch.Tensor):
        import torch  # here: reading a run's figures (SemanticScores) needs no torch

        target = torch.as_tensor(target).reshape(-1).to(torch.int64)
        prediction = torch.as_tensor(prediction).reshape(-1).to(torch.int64)
        if target.shape != prediction.shape:
            raise ValueError(
                f"target has {target.numel()} pixels but prediction has {prediction.numel()}"
            )
        prediction = prediction.to(target.device)
        n = self.num_classes
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= n):
            raise ValueError(f"prediction holds class ids outside [0, {n})")
        keep = (target >= 0) & (target < n)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        flat = target[keep] * n + prediction[keep]
        counts = torch.bincount(flat, minlength=n * n).reshape(n, n)
        self.matrix += counts.cpu().numpy()
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge confusion matrices of different class sets")
        self.matrix += other.matrix
        return self

    def state(self) -> np.ndarray:
        return self.matrix.copy()

    @classmethod
    def from_state(cls, matrix: np.ndarray, ignore_index: int | None = None) -> ConfusionMatrix:
        result = cls(int(matrix.shape[0]), ignore_index)
        result.matrix = np.asarray(matrix, dtype=np.int64).copy()
        return result

    def compute(self) -> SemanticScores:
        m = self.matrix
        return SemanticScores.from_counts(m.sum(axis=1), m.sum(axis=0), np.diag(m))
