"""segmentation_models_pytorch models through load_model (optional extra ``smp``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segflow.models import MissingWeightsError, load_model

smp = pytest.importorskip("segmentation_models_pytorch")

ENCODER = "resnet18"
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def random_images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def seeded_network(architecture: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.create_model(
        architecture, encoder_name=ENCODER, encoder_weights=None, classes=classes
    ).eval()


def reference_labels(network, image: np.ndarray, multiple: int) -> np.ndarray:
    """ImageNet-normalise, zero-pad bottom/right to ``multiple``, run, crop, argmax."""
    height, width = image.shape[:2]
    normalised = (image / 255.0 - MEAN) / STD
    batch = torch.from_numpy(normalised.astype(np.float32)).permute(2, 0, 1)[None]
    batch = F.pad(batch, (0, -width % multiple, 0, -height % multiple))
    with torch.no_grad():
        logits = network(batch)[..., :height, :width]
    return logits.argmax(dim=1)[0].numpy()


def test_unet_random_weights_round_trip_through_a_file(tmp_path):
    images = random_images([(64, 96), (40, 50)])
    first = load_model("smp:Unet", device="cpu", weights="none", encoder=ENCODER, classes=3)
    weights = tmp_path / "unet.pth"
    torch.save(first.network.state_dict(), weights)
    second = load_model("smp:Unet", device="cpu", weights=weights, encoder=ENCODER, classes=3)
    for left, right in zip(first.predict(images), second.predict(images), strict=True):
        assert torch.equal(left.labels, right.labels)


@pytest.mark.parametrize(("architecture", "multiple"), [("Unet", 1), ("FPN", 32), ("PSPNet", 8)])
def test_matches_direct_smp_with_padding_and_crop(tmp_path, architecture, multiple):
    network = seeded_network(architecture, classes=4)
    weights = tmp_path / f"{architecture}.pth"
    torch.save(network.state_dict(), weights)
    model = load_model(
        f"smp:{architecture}",
        device="cpu",
        weights=weights,
        encoder=ENCODER,
        classes=["w", "x", "y", "z"],
    )
    assert (model.task, model.classes) == ("semantic", ("w", "x", "y", "z"))
    images = random_images([(45, 70), (64, 64), (45, 70)])
    for image, prediction in zip(images, model.predict(images), strict=True):
        assert tuple(prediction.labels.shape) == image.shape[:2]
        np.testing.assert_array_equal(
            prediction.labels.numpy(), reference_labels(network, image, multiple)
        )


def test_class_count_names_classes_by_id():
    model = load_model("smp:FPN", device="cpu", weights="none", encoder=ENCODER, classes=2)
    assert model.classes == ("class_0", "class_1")


@pytest.mark.parametrize("classes", [0, "road", [], ["ok", ""]])
def test_bad_classes_are_refused(classes):
    with pytest.raises(ValueError, match="classes must be"):
        load_model("smp:Unet", device="cpu", weights="none", encoder=ENCODER, classes=classes)


def test_weights_must_be_given_or_explicitly_random():
    with pytest.raises(MissingWeightsError, match="weights='none'"):
        load_model("smp:Unet", device="cpu", encoder=ENCODER, classes=2)


def test_weights_of_another_class_count_are_refused(tmp_path):
    weights = tmp_path / "five.pth"
    torch.save(seeded_network("Unet", classes=5).state_dict(), weights)
    with pytest.raises(ValueError, match=f"weights file {weights} does not fit"):
        load_model("smp:Unet", device="cpu", weights=weights, encoder=ENCODER, classes=2)


@pytest.mark.slow
def test_deeplabv3plus_matches_direct_smp(tmp_path):
    network = seeded_network("DeepLabV3Plus", classes=3)
    weights = tmp_path / "dlv3p.pth"
    torch.save(network.state_dict(), weights)
    model = load_model(
        "smp:DeepLabV3Plus", device="cpu", weights=weights, encoder=ENCODER, classes=3
    )
    (image,) = random_images([(50, 70)])
    (prediction,) = model.predict([image])
    np.testing.assert_array_equal(
        prediction.labels.numpy(), reference_labels(network, image, multiple=16)
    )
