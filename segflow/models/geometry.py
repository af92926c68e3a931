"""Fitting images to a network's input contract and mapping logits back to image size.

Resizing is bilinear with ``align_corners=False`` and no antialiasing, the convention of
torchvision's reference evaluation and of the model cards' stated protocols (reproducing
their reference figures depends on it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def resize_bilinear(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def pad_to_fit(batch: torch.Tensor, *, multiple: int = 1, min_size: int = 1) -> torch.Tensor:
    """Zero-pad bottom and right so height and width are at least ``min_size`` and multiples
    of ``multiple``; the top-left origin stays put, so cropping the output back is a plain
    slice."""
    height, width = batch.shape[-2:]
    pad_height = _fitted(height, multiple, min_size) - height
    pad_width = _fitted(width, multiple, min_size) - width
    if pad_height == 0 and pad_width == 0:
        return batch
    return F.pad(batch, (0, pad_width, 0, pad_height))


def _fitted(side: int, multiple: int, min_size: int) -> int:
    side = max(side, min_size)
    return side + -side % multiple


def logits_at_input_size(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    *,
    fixed_size: tuple[int, int] | None = None,
    size_multiple: int | None = None,
    min_size: int | None = None,
) -> torch.Tensor:
    """Run ``forward`` on ``batch`` under the contract and return logits at the batch's size.

    ``fixed_size``: resize in, resize the logits back. ``size_multiple`` and ``min_size``
    (the smallest side the network takes; a smaller image is padded up to it): pad, then crop.
    """
    size = (int(batch.shape[-2]), int(batch.shape[-1]))
    if fixed_size is not None:
        return resize_bilinear(forward(resize_bilinear(batch, fixed_size)).float(), size)
    if size_multiple is not None or min_size is not None:
        padded = pad_to_fit(batch, multiple=size_multiple or 1, min_size=min_size or 1)
        return forward(padded)[..., : size[0], : size[1]]
    return forward(batch)
