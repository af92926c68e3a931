"""segflow.palette's blend, against the formula of its doc worked out pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.palette import colour, tint


@pytest.mark.parametrize("alpha", [0.45, 0.5, 1 / 3])
def test_tint_blends_each_painted_pixel_towards_its_colour(alpha):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    indices = rng.integers(-1, 6, (9, 11))
    out = tint(pixels, indices, alpha)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    for y in range(9):
        for x in range(11):
            index = int(indices[y, x])
            expected = [
                level if index < 0 else round((1 - alpha) * level + alpha * colour(index)[c])
                for c, level in enumerate(pixels[y, x].tolist())
            ]
            assert out[y, x].tolist() == expected, (y, x)


def test_tint_leaves_an_unpainted_image_as_it_was():
    pixels = np.full((2, 3, 3), 7, np.uint8)
    out = tint(pixels, np.full((2, 3), -1), 0.45)
    assert np.array_equal(out, pixels) and out is not pixels
