"""What a model returns for one image, whatever the model.

Every adapter in :mod:`segflow.models` answers a batch of RGB images with one of these per
image, at the image's own resolution, on the CPU or on the device the model ran on (the RLE
encoder takes either, so a GPU worker never copies full masks to the host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Task = Literal["semantic", "instance"]


@dataclass(frozen=True)
class SemanticPrediction:
    """A label map: ``labels[y, x]`` is the class id of pixel (x, y).

    ``scores``, when the caller asked for it, holds the softmax probability of the chosen class;
    ``probabilities``, when asked, every class's (soft IoU and Dice are computed from them).
    """

    labels: torch.Tensor  # (H, W) int64
    scores: torch.Tensor | None = None  # (H, W) float32 in [0, 1]
    probabilities: torch.Tensor | None = None  # (C, H, W) float32, summing to 1 per pixel

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])

    @property
    def width(self) -> int:
        return int(self.labels.shape[1])


@dataclass(frozen=True)
class InstancePrediction:
    """Detections of one image, sorted by descending score.

    Boxes are COCO ``[x, y, width, height]`` in pixels; masks are binary at image resolution.
    """

    boxes: torch.Tensor  # (N, 4) float32, xywh
    labels: torch.Tensor  # (N,) int64 class ids
    scores: torch.Tensor  # (N,) float32
    masks: torch.Tensor  # (N, H, W) bool

    @property
    def height(self) -> int:
        return int(self.masks.shape[1])

    @property
    def width(self) -> int:
        return int(self.masks.shape[2])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Prediction = SemanticPrediction | InstancePrediction
