"""Instance segmentation from an exported per-pixel network: the boundary-band method.

The classic trick of nuclei segmentation (DCAN, Chen et al. CVPR 2016; the U-Nets of the 2018
Data Science Bowl): besides class logits, the network predicts for each pixel whether it lies
in a thin band along the edge of an object instance. Within a class region, the pixels off
that band fall into one connected piece per object even where objects touch; each piece,
grown back over the band, is an instance. A semantic network with one more output channel
thus becomes an instance model, with no detection head to train.

The card is a semantic card (see :mod:`segflow.models.card`) with ``"task": "instance"``, the
graph returning the classes' logits and then one boundary logit, and an ``instances`` section::

    "instances": {"method": "boundary-band", "things": ["building", "car"],
                  "band": 2, "min_area": 20}

``things``: the classes whose regions are cut into instances; ``band``: the band's width in
pixels, as trained; ``min_area``: smaller pieces are dropped as noise. Predictions label each
instance with its class id among the card's classes, and score it by the mean probability of
that class over its mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import masks_to_boxes

from segflow.models.base import SegmentationModel
from segflow.models.card import ModelCard
from segflow.models.errors import ModelCardError
from segflow.models.exported import load_program
from segflow.models.geometry import logits_at_input_size
from segflow.models.instance import (
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_SCORE_THRESHOLD,
    check_thresholds,
    select_detections,
)
from segflow.prediction import InstancePrediction

METHOD = "boundary-band"


class BoundaryBandInstanceModel(SegmentationModel):
    def __init__(
        self,
        *,
        card: ModelCard,
        model_path: Path,
        forward,
        min_size: int | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_detections: int = DEFAULT_MAX_DETECTIONS,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        **runtime_options,
    ) -> None:
        super().__init__(name=card.name, task="instance", classes=card.classes, **runtime_options)
        check_thresholds(score_threshold, max_detections, mask_threshold)
        self.card = card
        self.model_path = model_path
        self._forward = forward
        self.min_size = min_size
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold

    def _predict_batch(self, images: torch.Tensor) -> list[InstancePrediction]:
        # Whole images: there is no tiling for instance models (an object cut by a window
        # edge would need merging across windows).
        return [self._instances(image_logits) for image_logits in self._logits(images)]

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """The class logits and the boundary logit, (N, C + 1, H, W), at the images' size."""
        logits = logits_at_input_size(
            self._forward,
            images.float().div(255),
            fixed_size=self.card.fixed_size,
            size_multiple=self.card.size_multiple,
            min_size=self.min_size,
        ).float()
        expected = (images.shape[0], len(self.classes) + 1, *images.shape[-2:])
        if tuple(logits.shape) != expected:
            raise ModelCardError(
                f"{self.model_path} returned logits of shape {tuple(logits.shape)} for input "
                f"{tuple(images.shape)}, but its card {self.card.path} implies {expected} "
                f"({len(self.classes)} class logits and one boundary logit, at input resolution)"
            )
        return logits

    def _instances(self, logits: torch.Tensor) -> InstancePrediction:
        probabilities = torch.softmax(logits[:-1], dim=0)
        labels = probabilities.argmax(dim=0)
        band = logits[-1] > 0
        candidates = []
        for class_id in self.card.instances.things:
            region = labels == class_id
            pieces = grow_into(
                connected_components(region & ~band), region, self.card.instances.band + 1
            )
            areas = torch.bincount(pieces.flatten())
            sums = torch.bincount(pieces.flatten(), weights=probabilities[class_id].flatten())
            ids = torch.nonzero(areas >= self.card.instances.min_area).flatten()
            ids = ids[ids > 0]  # 0: not an instance
            candidates.append(
                (
                    pieces[None] == ids[:, None, None],
                    torch.full_like(ids, class_id),
                    sums[ids] / areas[ids],
                )
            )
        masks, classes, scores = (torch.cat(parts) for parts in zip(*candidates, strict=True))
        # masks_to_boxes gives the last pixel's coordinates; the box ends one pixel further.
        boxes = masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1], device=masks.device)
        return select_detections(
            boxes,
            classes,
            scores,
            masks,  # binary: probabilities of 0 or 1
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
            mask_threshold=self.mask_threshold,
        )


def _neighbourhood_max(labels: torch.Tensor, *, diagonals: bool) -> torch.Tensor:
    """The largest value among each pixel and its 4 (or, with ``diagonals``, 8) neighbours."""
    result = labels.clone()
    result[1:] = torch.maximum(result[1:], labels[:-1])
    result[:-1] = torch.maximum(result[:-1], labels[1:])
    if diagonals:  # the vertical pass above already holds the column neighbours
        rows = result.clone()
        result[:, 1:] = torch.maximum(result[:, 1:], rows[:, :-1])
        result[:, :-1] = torch.maximum(result[:, :-1], rows[:, 1:])
    else:
        result[:, 1:] = torch.maximum(result[:, 1:], labels[:, :-1])
        result[:, :-1] = torch.maximum(result[:, :-1], labels[:, 1:])
    return result


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Labels (H, W) int64 of the 4-connected components of ``mask`` (H, W) bool: 0 off the
    mask, and on it, one positive label per component."""
    height, width = mask.shape
    index = torch.arange(1, height * width + 1, device=mask.device).view(height, width)
    labels = torch.where(mask, index, 0)
    while True:
        spread = torch.where(mask, _neighbourhood_max(labels, diagonals=False), 0)
        # Label L started at pixel L - 1, of the same component, whose own label may have
        # grown further: following that pointer (pointer jumping) takes about log(diameter)
        # rounds instead of one per pixel of the component's diameter.
        jumped = torch.where(mask, spread.view(-1)[(spread - 1).clamp(min=0)].view_as(spread), 0)
        if torch.equal(jumped, labels):
            return labels
        labels = jumped


def grow_into(labels: torch.Tensor, region: torch.Tensor, steps: int) -> torch.Tensor:
    """Extend labelled pixels (> 0) over the unlabelled pixels of ``region``, one pixel (8
    neighbours) a step, for ``steps`` steps; where two labels meet, the larger one wins."""
    for _ in range(steps):
        free = region & (labels == 0)
        labels = torch.where(free, _neighbourhood_max(labels, diagonals=True), labels)
    return labels


def load_pt2(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    **instance_options,
) -> BoundaryBandInstanceModel:
    """``precision="auto"`` is fp32, as for exported semantic models (see
    :func:`segflow.models.exported.load_pt2`); ``instance_options``: ``score_threshold``,
    ``max_detections``, ``mask_threshold``."""
    program = load_program(Path(path), device, weights, sha256, task="instance")
    return program.checked_model(
        BoundaryBandInstanceModel, Path(path), batch_size, precision, **instance_options
    )
