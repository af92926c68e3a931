"""Dataset metrics from one integer confusion matrix, checked against direct pixel counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segflow.metrics.semantic import ConfusionMatrix

NUM_CLASSES = 4
IGNORE = 255


def label_maps(shape):
    values = st.sampled_from([0, 1, 2, 3, IGNORE])
    return arrays(np.int64, shape, elements=values)


@st.composite
def image_pairs(draw):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    target = draw(label_maps((h, w)))
    prediction = draw(arrays(np.int64, (h, w), elements=st.integers(0, NUM_CLASSES - 1)))
    return target, prediction


def reference_iou(pairs):
    """IoU per class by counting pixels over the whole dataset, one class at a time."""
    target = np.concatenate([t.ravel() for t, _ in pairs])
    prediction = np.concatenate([p.ravel() for _, p in pairs])
    valid = target != IGNORE
    ious = []
    for c in range(NUM_CLASSES):
        inter = int(np.sum((target == c) & (prediction == c) & valid))
        union = int(np.sum(((target == c) | (prediction == c)) & valid))
        ious.append(inter / union if union else math.nan)
    accuracy = float(np.sum((target == prediction) & valid) / valid.sum()) if valid.any() else None
    return np.array(ious), accuracy


@settings(max_examples=150, deadline=None)
@given(st.lists(image_pairs(), min_size=1, max_size=5), st.randoms())
def test_merged_state_equals_direct_counting_in_any_order(pairs, rnd):
    expected_iou, expected_accuracy = reference_iou(pairs)
    # Split the images between two "workers" in a random order, then merge.
    order = list(range(len(pairs)))
    rnd.shuffle(order)
    left, right = ConfusionMatrix(NUM_CLASSES, IGNORE), ConfusionMatrix(NUM_CLASSES, IGNORE)
    for k, i in enumerate(order):
        (left if k % 2 else right).update(*pairs[i])
    scores = left.merge(right).compute()
    np.testing.assert_array_equal(np.isnan(scores.per_class_iou), np.isnan(expected_iou))
    np.testing.assert_allclose(scores.per_class_iou, expected_iou, rtol=0, atol=1e-15)
    if expected_accuracy is None:
        assert math.isnan(scores.pixel_accuracy)
    else:
        assert scores.pixel_accuracy == pytest.approx(expected_accuracy, abs=1e-15)
        assert scores.miou == pytest.approx(np.nanmean(expected_iou), abs=1e-15)


def test_dataset_miou_is_not_a_mean_of_image_mious():
    big_target = np.zeros((10, 10), np.int64)
    big_prediction = np.zeros((10, 10), np.int64)
    small_target = np.ones((1, 1), np.int64)
    small_prediction = np.zeros((1, 1), np.int64)
    matrix = ConfusionMatrix(2).update(big_target, big_prediction)
    matrix.update(small_target, small_prediction)
    scores = matrix.compute()
    # class 0: 100 hits, 1 false positive; class 1: 1 pixel, missed.
    np.testing.assert_allclose(scores.per_class_iou, [100 / 101, 0.0])
    assert scores.pixel_accuracy == pytest.approx(100 / 101)


def test_classes_absent_everywhere_are_undefined_not_zero():
    scores = ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 1]])).compute()
    assert scores.per_class_iou[2] != scores.per_class_iou[2]  # NaN
    assert scores.miou == 1.0


def test_state_round_trips_and_accepts_tensors():
    a = ConfusionMatrix(3, ignore_index=9).update(
        torch.tensor([[0, 9, 2]]), torch.tensor([[0, 1, 1]])
    )
    b = ConfusionMatrix.from_state(a.state(), ignore_index=9)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.matrix.sum() == 2


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(np.zeros((1, 1)), np.full((1, 1), 5))
    with pytest.raises(ValueError, match="different class sets"):
        ConfusionMatrix(2).merge(ConfusionMatrix(3))
