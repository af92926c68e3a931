"""Trimap IoU and the squared soft measures against implementations written here from their
definitions (loops, ``np.pad`` shifts), on random masks and on real CamVid frames.

Trimap IoU of class c in an image: the boundary of its ground truth Y is the pixels of Y with
a 4-neighbour inside the image not in Y; the band B is every pixel within chessboard distance
r of that boundary, minus the ignored pixels; I = |B ∩ Ŷ ∩ Y|, U = |B ∩ (Ŷ ∪ Y)|. Dataset:
ΣI / ΣU per class, meaned over the classes with ΣU > 0."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from segflow.groundtruth import open_ground_truth
from segflow.metrics.boundary import trimap_band
from segflow.metrics.figures import ClassSums
from segflow.prediction import SemanticPrediction
from segflow.scoring import SemanticScorer

CAMVID_CLASSES = 11
VOID = 11


def looped_band(mask: np.ndarray, valid: np.ndarray, r: int) -> np.ndarray:
    """The band, pixel by pixel, straight from the definition."""
    h, w = mask.shape
    band = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            neighbours = [(y + dy, x + dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            if any(0 <= v < h and 0 <= u < w and not mask[v, u] for v, u in neighbours):
                band[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = True
    return band & valid


def shifted_band(mask: np.ndarray, valid: np.ndarray, r: int) -> np.ndarray:
    """The same band by whole-array shifts: edge padding makes the outside of the image copy
    the pixel beside it (no boundary there), zero padding lets the square run off the image."""
    h, w = mask.shape
    edge = np.pad(mask, 1, mode="edge")
    outside_neighbour = ~edge[:-2, 1:-1] | ~edge[2:, 1:-1] | ~edge[1:-1, :-2] | ~edge[1:-1, 2:]
    boundary = np.pad(mask & outside_neighbour, r)
    band = np.zeros((h, w), bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            band |= boundary[dy : dy + h, dx : dx + w]
    return band & valid


def reference_counts(
    truth: np.ndarray, prediction: np.ndarray, r: int, num_classes: int
) -> np.ndarray:
    """(2, C): Trimap IoU's intersection and union per class of one image."""
    valid = (truth >= 0) & (truth < num_classes)
    counts = np.zeros((2, num_classes), np.int64)
    for c in range(num_classes):
        y, y_hat = truth == c, prediction == c
        band = shifted_band(y, valid, r)
        counts[:, c] = (band & y & y_hat).sum(), (band & (y | y_hat)).sum()
    return counts


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))),
    ignored=st.integers(0, 2**32 - 1),
    r=st.integers(0, 6),
)
def test_the_band_is_the_definition(mask, ignored, r):
    valid = np.random.default_rng(ignored).random(mask.shape) > 0.2
    expected = looped_band(mask, valid, r)
    np.testing.assert_array_equal(shifted_band(mask, valid, r), expected)  # the reference
    got = trimap_band(torch.from_numpy(mask), r, valid=torch.from_numpy(valid)).numpy()
    np.testing.assert_array_equal(got, expected)
    # Stacked masks are independent of each other.
    stacked = np.stack([mask, ~mask])
    got = trimap_band(torch.from_numpy(stacked), r, valid=torch.from_numpy(valid)).numpy()
    np.testing.assert_array_equal(got[1], looped_band(~mask, valid, r))


def test_the_image_border_makes_no_boundary_but_an_ignored_neighbour_does():
    mask = np.zeros((5, 9), bool)
    mask[:, :4] = True  # touches three sides of the image; its only edge is column 3
    valid = np.ones_like(mask)
    band = trimap_band(torch.from_numpy(mask), 1, valid=torch.from_numpy(valid)).numpy()
    assert band[:, 2:5].all() and not band[:, :2].any() and not band[:, 5:].any()
    # An ignored pixel is not in Y (the scorer's truth is -1 there): its neighbours are
    # boundary, and it is out of the band.
    mask[2, 0], valid[2, 0] = False, False
    band = trimap_band(torch.from_numpy(mask), 1, valid=torch.from_numpy(valid)).numpy()
    assert band[1, 0] and band[3, 1] and not band[2, 0]


def perturbed(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction: the labels shifted by a few pixels, a few blocks of
    another class, the void pixels filled with class 0."""
    prediction = np.roll(truth, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
    for _ in range(8):
        y, x = rng.integers(0, truth.shape[0] - 40), rng.integers(0, truth.shape[1] - 40)
        prediction[y : y + 40, x : x + 40] = rng.integers(0, CAMVID_CLASSES)
    return np.where(prediction == VOID, 0, prediction)


def test_scorer_counts_equal_the_reference_on_camvid_frames(shared: Path):
    labels_dir = shared / "data" / "camvid_val" / "labels"
    ground_truth = open_ground_truth(f"masks:{labels_dir}", ignore_index=VOID)
    frames = sorted((shared / "data" / "camvid_val" / "images").glob("*.png"))[::20]
    rng = np.random.default_rng(7)
    classes = [f"c{i}" for i in range(CAMVID_CLASSES)]
    for r in (1, 5):
        scorer = SemanticScorer(classes, trimap_width=r)
        expected = np.zeros((2, CAMVID_CLASSES), np.int64)
        for image_id, frame in enumerate(frames):
            truth = np.array(Image.open(labels_dir / frame.name), np.int64)
            prediction = perturbed(truth, rng)
            target = ground_truth.target(str(frame))
            labels = SemanticPrediction(labels=torch.from_numpy(prediction))
            row = scorer.score(image_id, str(frame), labels, [], target)
            counts = reference_counts(truth, prediction, r, CAMVID_CLASSES)
            [stats] = scorer._class_stats[-1:]
            got = np.zeros_like(counts)
            got[:, stats["class_id"]] = stats["trimap_intersection"], stats["trimap_union"]
            np.testing.assert_array_equal(got, counts)
            defined = counts[1] > 0
            assert row["gt_uri"] == target.source
            assert defined.any()
            expected += counts
        figures = scorer.compute()
        iou = [i / u if u else None for i, u in expected.T]
        assert figures["per_class_trimap_iou"] == iou
        assert figures["trimap_miou"] == pytest.approx(
            np.mean([v for v in iou if v is not None]), abs=1e-15
        )
        assert 0 < figures["trimap_miou"] < 1


def test_soft_sums_of_both_forms_equal_the_definition():
    rng = np.random.default_rng(3)
    num_classes, shape = 4, (23, 31)
    scorer = SemanticScorer([f"c{i}" for i in range(num_classes)])
    totals = {"i": np.zeros(num_classes), "l1": np.zeros(num_classes), "l2": np.zeros(num_classes)}
    for image_id in range(3):
        truth = rng.integers(-1, num_classes, shape)  # -1: ignored
        logits = rng.normal(size=(num_classes, *shape))
        p = np.exp(logits) / np.exp(logits).sum(0)
        prediction = SemanticPrediction(
            labels=torch.from_numpy(p.argmax(0)), probabilities=torch.from_numpy(p).float()
        )
        scorer.update(image_id, prediction, _target(truth))
        p32 = p.astype(np.float32).astype(np.float64)
        for c in range(num_classes):
            y = (truth == c).astype(float)[truth >= 0]
            q = p32[c][truth >= 0]
            totals["i"][c] += (y * q).sum()
            totals["l1"][c] += np.abs(q).sum() + np.abs(y).sum() - (y * q).sum()
            totals["l2"][c] += (q**2).sum() + (y**2).sum() - (y * q).sum()
    figures = scorer.compute()
    for suffix, union in (("", totals["l1"]), ("_squared", totals["l2"])):
        iou = totals["i"] / union
        dice = 2 * totals["i"] / (union + totals["i"])
        np.testing.assert_allclose(figures[f"per_class_soft_iou{suffix}"], iou, rtol=1e-9)
        assert figures[f"soft_miou{suffix}"] == pytest.approx(iou.mean(), rel=1e-9)
        assert figures[f"soft_mdice{suffix}"] == pytest.approx(dice.mean(), rel=1e-9)
    # Squaring probabilities below 1 shrinks the denominator: the squared form is higher.
    assert figures["soft_miou_squared"] > figures["soft_miou"]


def test_merged_scorers_equal_one_scorer_and_the_sums_of_their_rows():
    rng = np.random.default_rng(5)
    classes = ["a", "b", "c"]
    images = [(rng.integers(-1, 3, (17, 13)), rng.integers(0, 3, (17, 13))) for _ in range(6)]
    whole, left, right = (SemanticScorer(classes, trimap_width=2) for _ in range(3))
    for image_id, (truth, prediction) in enumerate(images):
        labels = SemanticPrediction(labels=torch.from_numpy(prediction))
        whole.update(image_id, labels, _target(truth))
        (left if image_id % 2 else right).update(image_id, labels, _target(truth))
    merged = right.merge(left).compute()
    assert merged == whole.compute()
    rows = whole.state()["class_stats"]
    assert ClassSums.of_rows(rows, len(classes)).figures() == merged
    expected = sum(reference_counts(t, p, 2, 3) for t, p in images)
    assert merged["per_class_trimap_iou"] == [
        i / u if u else None for i, u in expected.T
    ] and not any(v is not None and math.isnan(v) for v in merged["per_class_trimap_iou"])
    whole.reset()
    assert whole.compute()["miou"] is None


def _target(truth: np.ndarray):
    from segflow.groundtruth import SemanticTarget

    return SemanticTarget(labels=truth, source="generated")
