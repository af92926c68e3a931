"""Turning a list of differently sized images into stackable sub-batches, and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def as_image_tensor(image: object, index: int) -> torch.Tensor:
    """Validate one input image and return it as a uint8 (H, W, 3) tensor (no copy if possible)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"images[{index}] must be uint8, got dtype {image.dtype}")
        # torch.from_numpy rejects negative strides (a flipped view) and warns on read-only
        # arrays (np.asarray of a PIL image): those are copied.
        writable = image.flags.writeable
        tensor = torch.from_numpy(np.ascontiguousarray(image) if writable else image.copy())
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"images[{index}] must be uint8, got dtype {image.dtype}")
        tensor = image
    else:
        raise TypeError(
            f"images[{index}] must be a numpy array or torch tensor, got {type(image).__name__}"
        )
    if tensor.ndim != 3 or tensor.shape[2] != 3:
        raise ValueError(
            f"images[{index}] must be an RGB image of shape (H, W, 3), got {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"images[{index}] is empty: shape {tuple(tensor.shape)}")
    return tensor


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of same-sized images, grouped into sub-batches of at most ``batch_size``.

    Groups follow the order in which each size first appears, and indices inside a group keep
    input order, so the caller can scatter results back with the returned indices.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in groups.values()
        for start in range(0, len(indices), batch_size)
    ]
