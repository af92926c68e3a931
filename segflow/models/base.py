"""The one interface every model answers: ``predict(images) -> predictions``."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from segflow.models.batching import as_image_tensor, size_batches
from segflow.models.runtime import autocast_dtype, memory_format
from segflow.prediction import Prediction, Task


class SegmentationModel(ABC):
    """A loaded model. Subclasses implement :meth:`_predict_batch` for one stack of
    same-sized images; this class handles validation, size grouping, device placement,
    inference mode and autocast."""

    def __init__(
        self,
        *,
        name: str,
        task: Task,
        classes: Sequence[str],
        device: torch.device,
        batch_size: int = 8,
        precision: str = "auto",
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.name = name
        self.task: Task = task
        self.classes: tuple[str, ...] = tuple(classes)
        self.device = device
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype(precision, device)
        self.memory_format = memory_format(channels_last, device)

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[Prediction]:
        """One prediction per RGB uint8 (H, W, 3) image, in input order, at each image's size."""
        if isinstance(images, np.ndarray | torch.Tensor):
            raise TypeError(
                "images must be a sequence of (H, W, 3) images; wrap a single image in a list"
            )
        tensors = [as_image_tensor(image, index) for index, image in enumerate(images)]
        results: list[Prediction | None] = [None] * len(tensors)
        sizes = [(int(t.shape[0]), int(t.shape[1])) for t in tensors]
        with torch.inference_mode(), self._autocast():
            for indices in size_batches(sizes, self.batch_size):
                stacked = torch.stack([tensors[i] for i in indices]).to(self.device)
                # (N, H, W, 3) permuted to NCHW is already channels_last in memory.
                batch = stacked.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
                predictions = self._predict_batch(batch)
                for index, prediction in zip(indices, predictions, strict=True):
                    results[index] = prediction
        return results  # type: ignore[return-value]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def _predict_batch(self, images: torch.Tensor) -> list[Prediction]:
        """Predictions for a uint8 (N, 3, H, W) batch on ``self.device``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, task={self.task!r}, "
            f"classes={len(self.classes)}, device={self.device})"
        )
