"""What a model returns for one image, whatever the model: public and stable, the types a
model of the user's own returns too (:mod:`segflow.models.user`).

Every model answers a batch of RGB images (``predict(images)``) with one of these per image,
in input order, at the image's own resolution, on the CPU or on the device the model ran on
(the RLE encoder takes either, so a GPU worker never copies full masks to the host):

- a semantic model (``task == "semantic"``), a :class:`SemanticPrediction`: ``labels`` an
  (H, W) int64 map of class ids in ``[0, len(classes))``; ``scores`` and ``probabilities``
  optional (segflow asks its own models for them; a user model may leave them ``None``, and
  soft metrics then are not computed);
- an instance model (``task == "instance"``), an :class:`InstancePrediction`: N detections
  sorted by descending score, ``boxes`` COCO xywh in pixels, ``labels`` class ids,
  ``scores`` in [0, 1], ``masks`` (N, H, W) bool at image resolution.

Fields are added only with a default, so a model written against this module keeps working.
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
