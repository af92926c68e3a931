"""predict(): input validation, size grouping, order restoration, inference mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segflow.models import SemanticModel
from segflow.models.batching import size_batches


class BrightestChannel(SemanticModel):
    """Labels each pixel with its brightest channel (0 = R, 1 = G, 2 = B), and records the
    batches it was given."""

    def __init__(self, batch_size: int, return_scores: bool = False) -> None:
        super().__init__(
            name="brightest",
            classes=("red", "green", "blue"),
            device=torch.device("cpu"),
            batch_size=batch_size,
            return_scores=return_scores,
        )
        self.batch_shapes: list[tuple[int, ...]] = []
        self.saw_inference_mode: list[bool] = []

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        self.batch_shapes.append(tuple(images.shape))
        self.saw_inference_mode.append(torch.is_inference_mode_enabled())
        return images.float()


def images_of_sizes(sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # Distinct channel values per pixel, so the brightest channel is never a tie.
    return [np.argsort(rng.random((h, w, 3)), axis=2).astype(np.uint8) * 80 for h, w in sizes]


@given(
    sizes=st.lists(st.sampled_from([(2, 3), (3, 2), (4, 4)]), max_size=20),
    batch_size=st.integers(1, 5),
)
def test_size_batches_partition_indices_into_same_size_groups(sizes, batch_size):
    groups = size_batches(sizes, batch_size)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    for group in groups:
        assert 1 <= len(group) <= batch_size
        assert len({sizes[i] for i in group}) == 1
        assert group == sorted(group)


def test_predict_restores_input_order_across_mixed_sizes():
    sizes = [(5, 7), (6, 4), (5, 7), (3, 3), (6, 4), (5, 7), (5, 7)]
    images = images_of_sizes(sizes)
    model = BrightestChannel(batch_size=2)
    predictions = model.predict(images)
    assert len(predictions) == len(images)
    for image, prediction in zip(images, predictions, strict=True):
        np.testing.assert_array_equal(prediction.labels.numpy(), image.argmax(axis=2))
    # Four (5, 7) images in sub-batches of at most two: batching really happened.
    assert sorted(shape[0] for shape in model.batch_shapes) == [1, 2, 2, 2]
    assert all(model.saw_inference_mode)


def test_batched_prediction_equals_one_by_one():
    images = images_of_sizes([(4, 6), (8, 2), (4, 6), (4, 6)])
    batched = BrightestChannel(batch_size=8).predict(images)
    single = [BrightestChannel(batch_size=1).predict([image])[0] for image in images]
    for left, right in zip(batched, single, strict=True):
        assert torch.equal(left.labels, right.labels)


def test_tensor_and_array_inputs_agree():
    (image,) = images_of_sizes([(5, 5)])
    model = BrightestChannel(batch_size=4)
    from_array, from_tensor = model.predict([image, torch.from_numpy(image.copy())])
    assert torch.equal(from_array.labels, from_tensor.labels)


def test_flipped_array_views_are_accepted():
    (image,) = images_of_sizes([(4, 5)])
    flipped = image[:, ::-1]
    (prediction,) = BrightestChannel(batch_size=1).predict([flipped])
    np.testing.assert_array_equal(prediction.labels.numpy(), flipped.argmax(axis=2))


def test_empty_input_gives_empty_output():
    assert BrightestChannel(batch_size=1).predict([]) == []


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), TypeError, r"images\[1\] must be uint8"),
        (np.zeros((4, 4), dtype=np.uint8), ValueError, r"images\[1\] must be an RGB image"),
        (np.zeros((4, 4, 4), dtype=np.uint8), ValueError, r"images\[1\] must be an RGB image"),
        (np.zeros((0, 4, 3), dtype=np.uint8), ValueError, r"images\[1\] is empty"),
        ([[1, 2, 3]], TypeError, r"images\[1\] must be a numpy array or torch tensor"),
    ],
)
def test_bad_images_are_named_by_position(bad, error, message):
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(error, match=message):
        BrightestChannel(batch_size=1).predict([good, bad])


def test_a_single_image_must_be_wrapped_in_a_list():
    with pytest.raises(TypeError, match="wrap a single image in a list"):
        BrightestChannel(batch_size=1).predict(np.zeros((4, 4, 3), dtype=np.uint8))


def test_return_scores_are_the_winning_softmax_probability():
    (image,) = images_of_sizes([(3, 4)])
    (prediction,) = BrightestChannel(batch_size=1, return_scores=True).predict([image])
    logits = image.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=2, keepdims=True))
    probabilities /= probabilities.sum(axis=2, keepdims=True)
    assert prediction.scores.dtype == torch.float32
    np.testing.assert_allclose(prediction.scores.numpy(), probabilities.max(axis=2), rtol=1e-6)
