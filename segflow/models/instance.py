"""Instance post-processing shared by detection backends (COCO-style defaults)."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

from segflow.prediction import InstancePrediction

DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_MAX_DETECTIONS = 100
DEFAULT_MASK_THRESHOLD = 0.5


def check_thresholds(score_threshold: float, max_detections: int, mask_threshold: float) -> None:
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    if not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold!r}")


def select_detections(
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    mask_probabilities: torch.Tensor,
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
) -> InstancePrediction:
    """Keep detections scoring above ``score_threshold``, best ``max_detections`` first, with
    masks binarised above ``mask_threshold`` (strict inequalities, as torchvision's reference
    does). ``mask_probabilities`` is (N, H, W) at image resolution."""
    kept = torch.nonzero(scores > score_threshold).squeeze(1)
    order = torch.argsort(scores[kept], descending=True, stable=True)[:max_detections]
    kept = kept[order]
    return InstancePrediction(
        boxes=box_convert(boxes_xyxy[kept].float(), in_fmt="xyxy", out_fmt="xywh"),
        labels=labels[kept].to(torch.int64),
        scores=scores[kept].float(),
        masks=mask_probabilities[kept] > mask_threshold,
    )
