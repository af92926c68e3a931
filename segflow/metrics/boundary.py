"""Boundary regions for Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric
Image Segmentation Evaluation", CVPR 2021).

A mask's boundary region is the set of its pixels within ``d`` pixels (chessboard distance)
of a pixel outside it, the image border counting as outside: the mask minus its erosion by a
``(2d + 1)``-square. ``d`` is 2% of the image diagonal, rounded, at least 1 — the reference
implementation's ``mask_to_boundary`` (3×3 erosion iterated ``d`` times on a zero-padded
mask). Boundary IoU of two masks is the IoU of their boundary regions.

The erosion is computed with box sums from cumulative sums, separably (a square is a row
segment times a column segment): exact, and linear in the pixels whatever ``d`` is, where
iterated 3×3 erosions cost ``d`` passes (52 for a 2149×1480 aerial tile).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DILATION_RATIO = 0.02


def boundary_width(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """``d`` for an image of this size, as the reference computes it."""
    # sqrt of the sum, not hypot: the reference's float, so the rounding agrees at .5
    return max(1, round(ratio * math.sqrt(height**2 + width**2)))


def boundary_region(
    masks: torch.Tensor, width: int, *, dont_care: torch.Tensor | None = None
) -> torch.Tensor:
    """The boundary regions of a stack of binary masks ``(..., H, W)``, as bool.

    Pixels where ``dont_care`` is true (ground truth's ignored pixels) count as inside the
    mask for the erosion, so that they do not create a boundary.
    """
    masks = masks.to(torch.bool)
    solid = masks if dont_care is None else masks | dont_care
    return masks & ~_erode(_erode(solid, width, dim=-2), width, dim=-1)


def _erode(masks: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """Erosion along one axis by a ``2 * width + 1`` segment, outside the image counting as 0."""
    length = masks.shape[dim]
    padding = [0, 0, 0, 0]
    padding[0 if dim == -1 else 2] = width + 1  # one more before, so the sums start at 0
    padding[1 if dim == -1 else 3] = width
    sums = F.pad(masks.to(torch.int32), padding).cumsum(dim)
    window = 2 * width + 1
    upper = sums.narrow(dim, window, length)
    lower = sums.narrow(dim, 0, length)
    return (upper - lower) == window
