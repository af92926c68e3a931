"""torchvision models through load_model, against torchvision's own pipeline run directly.

Random weights (seeded) stand in for the pretrained ones, which are not downloaded in CI;
tiny inputs and small internal resize sizes keep the fast tests fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import get_model, get_model_weights

from segflow.models import load_model
from segflow.models.instance import select_detections
from segflow.prediction import InstancePrediction, SemanticPrediction

SEMANTIC = [
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]
INSTANCE = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
SMALL_RESIZE = 64
DETECTION_SIZES = {"min_size": 64, "max_size": 96}


def random_images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def seeded_network(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    categories = get_model_weights(name).DEFAULT.meta["categories"]
    network = get_model(
        name, weights=None, weights_backbone=None, num_classes=len(categories), **options
    )
    return network.eval()


def torchvision_semantic_reference(name: str, network, image: np.ndarray) -> np.ndarray:
    """torchvision's reference evaluation: the weights' transforms, the network, bilinear
    logits back to image size, argmax."""
    transforms = get_model_weights(name).DEFAULT.transforms(resize_size=SMALL_RESIZE)
    batch = transforms(torch.from_numpy(image).permute(2, 0, 1)[None])
    with torch.no_grad():
        logits = network(batch)["out"]
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)[0].numpy()


def check_semantic_against_torchvision(name, tmp_path, **build_options):
    network = seeded_network(name, **build_options)
    weights = tmp_path / f"{name}.pth"
    torch.save(network.state_dict(), weights)
    model = load_model(name, device="cpu", weights=weights, resize_size=SMALL_RESIZE)
    assert model.task == "semantic"
    assert model.classes == tuple(get_model_weights(name).DEFAULT.meta["categories"])
    images = random_images([(37, 50), (50, 37)])
    for image, prediction in zip(images, model.predict(images), strict=True):
        assert isinstance(prediction, SemanticPrediction)
        np.testing.assert_array_equal(
            prediction.labels.numpy(), torchvision_semantic_reference(name, network, image)
        )


def test_lraspp_matches_torchvision_reference(tmp_path):
    check_semantic_against_torchvision("lraspp_mobilenet_v3_large", tmp_path)


def test_checkpoint_with_auxiliary_head_loads(tmp_path):
    # Pretrained deeplabv3/fcn checkpoints carry an aux_classifier the inference path drops.
    check_semantic_against_torchvision("deeplabv3_mobilenet_v3_large", tmp_path, aux_loss=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEMANTIC)
def test_every_semantic_builder_matches_torchvision_reference(name, tmp_path):
    check_semantic_against_torchvision(name, tmp_path)


def test_pretrained_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    name = "lraspp_mobilenet_v3_large"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / get_model_weights(name).DEFAULT.url.split("/")[-1]
    cached.parent.mkdir(parents=True)
    network = seeded_network(name)
    torch.save(network.state_dict(), cached)
    model = load_model(name, device="cpu", resize_size=SMALL_RESIZE)
    (image,) = random_images([(40, 30)])
    (prediction,) = model.predict([image])
    np.testing.assert_array_equal(
        prediction.labels.numpy(), torchvision_semantic_reference(name, network, image)
    )


def test_semantic_batches_equal_one_by_one_predictions():
    model = load_model("lraspp_mobilenet_v3_large", device="cpu", weights="none", resize_size=48)
    images = random_images([(30, 40), (41, 33), (30, 40), (41, 33), (30, 40)], seed=5)
    batched = model.predict(images)
    for image, prediction in zip(images, batched, strict=True):
        (alone,) = model.predict([image])
        assert tuple(prediction.labels.shape) == image.shape[:2]
        assert torch.equal(prediction.labels, alone.labels)


def numpy_detections(raw: dict, score_threshold, max_detections, mask_threshold):
    scores = raw["scores"].numpy()
    keep = np.flatnonzero(scores > score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections]
    x1, y1, x2, y2 = raw["boxes"].numpy()[keep].T
    return {
        "boxes": np.stack([x1, y1, x2 - x1, y2 - y1], axis=1),
        "labels": raw["labels"].numpy()[keep],
        "scores": scores[keep],
        "masks": raw["masks"].numpy()[keep, 0] > mask_threshold,
    }


def assert_instances_equal(prediction: InstancePrediction, expected: dict, image_shape) -> None:
    assert prediction.boxes.dtype == torch.float32
    assert prediction.labels.dtype == torch.int64
    assert prediction.masks.dtype == torch.bool
    assert (prediction.height, prediction.width) == image_shape
    np.testing.assert_allclose(prediction.boxes.numpy(), expected["boxes"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(prediction.labels.numpy(), expected["labels"])
    np.testing.assert_allclose(prediction.scores.numpy(), expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(prediction.masks.numpy(), expected["masks"])


def check_instance_against_torchvision(name: str, tmp_path, *, drop_batch_counters: bool):
    thresholds = {"score_threshold": 0.0, "max_detections": 7, "mask_threshold": 0.3}
    network = seeded_network(
        name, box_score_thresh=0.0, box_detections_per_img=7, **DETECTION_SIZES
    )
    state = network.state_dict()
    if drop_batch_counters:
        # Pretrained detection checkpoints use frozen batch norm, which has no counters.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    weights = tmp_path / f"{name}.pth"
    torch.save(state, weights)
    model = load_model(name, device="cpu", weights=weights, **thresholds, **DETECTION_SIZES)
    assert model.task == "instance"
    assert model.classes[1] == "person"
    images = random_images([(45, 60), (45, 60)], seed=1)
    predictions = model.predict(images)
    with torch.no_grad():
        raw = network([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images])
    for image, prediction, found in zip(images, predictions, raw, strict=True):
        assert 0 < len(prediction) <= 7
        expected = numpy_detections(found, **thresholds)
        assert_instances_equal(prediction, expected, image.shape[:2])


def test_maskrcnn_matches_torchvision_with_postprocessing(tmp_path):
    check_instance_against_torchvision("maskrcnn_resnet50_fpn", tmp_path, drop_batch_counters=True)


@pytest.mark.slow
def test_maskrcnn_v2_matches_torchvision_with_postprocessing(tmp_path):
    check_instance_against_torchvision(
        "maskrcnn_resnet50_fpn_v2", tmp_path, drop_batch_counters=False
    )


def synthetic_detections(count=12, height=6, width=8, seed=2) -> dict:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 5, size=(count, 2))
    sizes = rng.uniform(0.5, 3, size=(count, 2))
    return {
        "boxes": torch.from_numpy(np.hstack([corners, corners + sizes]).astype(np.float32)),
        "labels": torch.from_numpy(rng.integers(1, 91, size=count)),
        "scores": torch.from_numpy(rng.uniform(0, 1, size=count).astype(np.float32)),
        "masks": torch.from_numpy(rng.uniform(0, 1, size=(count, 1, height, width))),
    }


@pytest.mark.parametrize(
    ("score_threshold", "max_detections", "mask_threshold"),
    [(0.05, 100, 0.5), (0.5, 100, 0.5), (0.0, 3, 0.2), (0.9, 1, 0.9), (1.0, 5, 0.5)],
)
def test_select_detections_applies_thresholds(score_threshold, max_detections, mask_threshold):
    raw = synthetic_detections()
    prediction = select_detections(
        raw["boxes"],
        raw["labels"],
        raw["scores"],
        raw["masks"][:, 0],
        score_threshold=score_threshold,
        max_detections=max_detections,
        mask_threshold=mask_threshold,
    )
    expected = numpy_detections(raw, score_threshold, max_detections, mask_threshold)
    assert_instances_equal(prediction, expected, (6, 8))
    assert torch.all(prediction.scores[:-1] >= prediction.scores[1:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"max_detections": 0}, "max_detections"),
        ({"mask_threshold": 1.0}, "mask_threshold"),
    ],
)
def test_bad_thresholds_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_model("maskrcnn_resnet50_fpn", device="cpu", weights="none", **options)
