"""Dataset-level semantic segmentation metrics from one integer confusion matrix.

mIoU is computed from the summed matrix (as torchvision's reference ``ConfusionMatrix`` and
the Cityscapes/VOC benchmarks do), never as a mean of per-image IoUs: the two differ whenever
images differ in size or class frequency. Its margins reduce to figures in
:class:`~segflow.metrics.figures.SemanticScores`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from segflow.metrics.figures import SemanticScores


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
