"""The colour segflow draws a class or a detection in, the same in every picture it makes
(``segflow show``, ``segflow report``), and how it is laid over an image: each painted pixel
becomes ``(1 - alpha) * pixel + alpha * colour``, rounded to the nearest level."""

from __future__ import annotations

import colorsys

import numpy as np


def colour(index: int) -> tuple[int, int, int]:
    """Distinct colours for small indexes: hues a golden-ratio turn apart, so neighbouring
    ids never look alike, brightness alternating."""
    value = 0.95 if index % 2 == 0 else 0.75
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.8, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def tint(pixels: np.ndarray, indices: np.ndarray, alpha: float) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 with every pixel of ``indices`` (H, W) >= 0 blended towards
    that index's :func:`colour`; pixels of index -1 keep theirs."""
    painted = indices >= 0
    if not painted.any():
        return pixels.copy()
    colours = np.array([colour(i) for i in range(int(indices.max()) + 1)], np.float64)
    # Every blend of a level of a channel towards a colour, rounded, then looked up: one
    # uint8 gather a pixel instead of float arithmetic on it (a report's thumbnail: 12 -> 4
    # ms), the same levels.
    levels = np.arange(256, dtype=np.float64)
    blends = np.rint((1 - alpha) * levels + alpha * colours[:, :, None]).astype(np.uint8)
    at = (np.where(painted, indices, 0)[..., None] * 3 + np.arange(3)) * 256 + pixels
    return np.where(painted[..., None], blends.ravel()[at], pixels)
