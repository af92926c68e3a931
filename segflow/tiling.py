"""Tiled inference for images larger than a model should see at once (aerial tiles up to
10k x 10k and beyond).

The image is cut into overlapping ``tile x tile`` windows. Each window's logits are weighted
by a ramp that falls towards the window's edges — where a network sees the least context and
its zero padding — and the weighted logits of all windows are summed and normalised before
the argmax, so neighbouring windows blend instead of meeting at a seam.

Memory stays bounded by one band of rows: windows are processed one row of windows at a
time, and the rows that no later window touches are finalised (argmax) and dropped, so a
C-class, W-wide image needs about ``C x (tile + stride) x W`` floats, not ``C x H x W``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from segflow.prediction import SemanticPrediction


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering ``[0, length)`` with at least ``overlap`` shared pixels; the last
    window ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def ramp(size: int, overlap: int, *, fade_start: bool, fade_end: bool, device) -> torch.Tensor:
    """1-D blending weights of a window: 1 in the middle, falling over ``overlap`` pixels
    towards the sides that border another window (never to 0, so every pixel has weight).
    Sides on the image border keep weight 1: no other window covers them, and the untiled
    model sees the same border there."""
    position = torch.arange(size, device=device, dtype=torch.float32)
    distance = torch.full_like(position, float(overlap + 1))
    if fade_start:
        distance = torch.minimum(distance, position + 1)
    if fade_end:
        distance = torch.minimum(distance, size - position)
    # Cubed, so the window edge (where the network saw zero padding instead of the image)
    # weighs (1 / (overlap + 1))^3 against the neighbour's well-informed middle.
    return (distance / (overlap + 1)) ** 3


def tiled_prediction(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    return_scores: bool = False,
    return_probabilities: bool = False,
) -> SemanticPrediction:
    """The label map (H, W) int64 of one image (1, 3, H, W), and optionally the winning softmax
    probability (H, W) and every class's (C, H, W), running ``logits_fn`` on windows of at
    most ``tile x tile``. The probabilities are the one output as large as the logits."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"tiled inference takes one image (1, 3, H, W), got {tuple(image.shape)}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    rows = tile_starts(height, tile, overlap)
    columns = tile_starts(width, tile, overlap)
    device = image.device
    labels = torch.empty((height, width), dtype=torch.int64, device=device)
    scores = (
        torch.empty((height, width), dtype=torch.float32, device=device) if return_scores else None
    )
    probabilities: torch.Tensor | None = None  # (C, H, W), allocated once C is known

    band_top = 0  # first image row held in the accumulators
    accumulated: torch.Tensor | None = None  # (C, rows held, W)
    weights = torch.zeros((0, width), device=device)
    for row_index, top in enumerate(rows):
        bottom = min(top + tile, height)
        needed = bottom - band_top
        if accumulated is not None and accumulated.shape[1] < needed:
            grow = needed - accumulated.shape[1]
            accumulated = torch.cat(
                [accumulated, accumulated.new_zeros((accumulated.shape[0], grow, width))], 1
            )
            weights = torch.cat([weights, weights.new_zeros((grow, width))], 0)
        row_weight = ramp(
            bottom - top, overlap, fade_start=top > 0, fade_end=bottom < height, device=device
        )
        for left in columns:
            right = min(left + tile, width)
            window = logits_fn(image[..., top:bottom, left:right])[0].float()
            if accumulated is None:
                accumulated = window.new_zeros((window.shape[0], needed, width))
                weights = window.new_zeros((needed, width))
            column_weight = ramp(
                right - left, overlap, fade_start=left > 0, fade_end=right < width, device=device
            )
            weight = row_weight[:, None] * column_weight[None, :]
            accumulated[:, top - band_top : bottom - band_top, left:right] += window * weight
            weights[top - band_top : bottom - band_top, left:right] += weight
        # Rows above the next window's top are final: no later window reaches them.
        done = rows[row_index + 1] if row_index + 1 < len(rows) else height
        finished = done - band_top
        blended = accumulated[:, :finished] / weights[:finished]
        if return_scores or return_probabilities:
            softmax = torch.softmax(blended, dim=0)
            best, winner = softmax.max(dim=0)
            labels[band_top:done] = winner
            if scores is not None:
                scores[band_top:done] = best
            if return_probabilities:
                if probabilities is None:
                    probabilities = softmax.new_empty((softmax.shape[0], height, width))
                probabilities[:, band_top:done] = softmax
        else:
            labels[band_top:done] = blended.max(dim=0).indices
        accumulated = accumulated[:, finished:]
        weights = weights[finished:]
        band_top = done
    return SemanticPrediction(labels=labels, scores=scores, probabilities=probabilities)
