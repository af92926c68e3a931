"""Boundary regions against the reference's definition: a 3×3 erosion iterated d times on a
zero-padded mask (Cheng et al.'s ``mask_to_boundary``, written here with numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segflow.metrics.boundary import boundary_region, boundary_width


def reference_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    height, width = mask.shape
    padded = np.pad(mask.astype(bool), 1)
    for _ in range(dilation):
        # cv2.erode leaves the outside of its input alone; the zero pad does the eroding.
        around = np.pad(padded, 1, constant_values=True)
        eroded = np.ones_like(padded)
        for dy in range(3):
            for dx in range(3):
                eroded &= around[dy : dy + padded.shape[0], dx : dx + padded.shape[1]]
        padded = eroded
    return mask.astype(bool) & ~padded[1 : height + 1, 1 : width + 1]


@settings(max_examples=200, deadline=None)
@given(
    mask=arrays(bool, st.tuples(st.integers(1, 30), st.integers(1, 30))),
    dilation=st.integers(1, 8),
)
def test_boundary_region_equals_iterated_erosion(mask, dilation):
    got = boundary_region(torch.from_numpy(mask), dilation).numpy()
    np.testing.assert_array_equal(got, reference_boundary(mask, dilation))


def test_stacked_masks_are_independent():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 25)) < 0.6
    stacked = boundary_region(torch.from_numpy(masks), 2).numpy()
    for mask, got in zip(masks, stacked, strict=True):
        np.testing.assert_array_equal(got, reference_boundary(mask, 2))


def test_dont_care_pixels_make_no_boundary():
    mask = np.zeros((20, 20), bool)
    mask[:, :10] = True
    dont_care = np.zeros_like(mask)
    dont_care[:, 10:] = True  # the rest of the image is ignored: no boundary at column 10
    region = boundary_region(torch.from_numpy(mask), 2, dont_care=torch.from_numpy(dont_care))
    assert not region[:, 7:10].numpy()[2:-2].any()
    assert region[:, :2].all()  # the image border still counts as outside


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(360, 480, 12), (1, 1, 1), (10, 10, 1), (1480, 2149, 52)],
)
def test_boundary_width_is_two_percent_of_the_diagonal(height, width, expected):
    assert boundary_width(height, width) == expected
