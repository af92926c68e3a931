"""torchvision's segmentation and Mask R-CNN models, with their reference preprocessing.

Pretrained weights come from a local file or the torch hub cache, never from the network;
class names come from the weights enum, which torchvision ships (no download needed).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum, get_model_builder, get_model_weights

from segflow.models.base import SegmentationModel
from segflow.models.errors import MissingWeightsError
from segflow.models.geometry import resize_bilinear
from segflow.models.instance import (
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_SCORE_THRESHOLD,
    check_thresholds,
    select_detections,
)
from segflow.models.runtime import prepare_module, resolve_device
from segflow.models.semantic import SemanticModel
from segflow.models.weights import (
    RANDOM_WEIGHTS,
    apply_state_dict,
    read_state_dict,
    wants_random_weights,
)
from segflow.prediction import InstancePrediction


def hub_checkpoint_path(pretrained: WeightsEnum) -> Path:
    """Where ``torch.hub`` keeps the file of ``pretrained`` once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained.url).path).name


def default_weights_path(name: str) -> Path:
    """The file the model ``name`` reads its default pretrained weights from."""
    return hub_checkpoint_path(get_model_weights(name).DEFAULT)


class TorchvisionSemanticModel(SemanticModel):
    def __init__(self, *, network: torch.nn.Module, transforms: torch.nn.Module, **options):
        super().__init__(**options)
        self.network = prepare_module(network, self.device, self.memory_format)
        self.transforms = transforms

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        # The weights' transforms: resize (shorter side, antialiased), scale to [0, 1], normalise.
        inputs = self.transforms(images).contiguous(memory_format=self.memory_format)
        logits = self.network(inputs)["out"]
        return resize_bilinear(logits.float(), (images.shape[-2], images.shape[-1]))


class MaskRCNNModel(SegmentationModel):
    def __init__(
        self,
        *,
        network: torch.nn.Module,
        score_threshold: float,
        max_detections: int,
        mask_threshold: float,
        **options,
    ):
        super().__init__(task="instance", **options)
        self.network = prepare_module(network, self.device, self.memory_format)
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold

    def _predict_batch(self, images: torch.Tensor) -> list[InstancePrediction]:
        # Mask R-CNN resizes and normalises internally and pastes masks back at input size.
        detections = self.network(list(images.float().div(255)))
        return [
            select_detections(
                found["boxes"],
                found["labels"],
                found["scores"],
                found["masks"][:, 0],
                score_threshold=self.score_threshold,
                max_detections=self.max_detections,
                mask_threshold=self.mask_threshold,
            )
            for found in detections
        ]


def load_semantic(
    name: str,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
    resize_size: int | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    channels_last: bool | None = None,
    **semantic_options,
) -> TorchvisionSemanticModel:
    """``resize_size``: shorter image side fed to the network (default: the weights' own,
    520 for every model here); logits are resized back to each image's size."""
    pretrained = get_model_weights(name).DEFAULT
    classes = pretrained.meta["categories"]
    state, source = _pretrained_state(name, pretrained, weights, sha256)
    builder_options: dict[str, object] = {"num_classes": len(classes)}
    if state is not None and any(key.startswith("aux_classifier.") for key in state):
        builder_options["aux_loss"] = True
    network = _build(name, builder_options, state, source)
    # The auxiliary head only serves training; dropping it skips its compute at inference.
    if getattr(network, "aux_classifier", None) is not None:
        network.aux_classifier = None
    if resize_size is not None and (not isinstance(resize_size, int) or resize_size < 1):
        raise ValueError(f"resize_size must be a positive integer, got {resize_size!r}")
    transforms = (
        pretrained.transforms()
        if resize_size is None
        else pretrained.transforms(resize_size=resize_size)
    )
    return TorchvisionSemanticModel(
        name=name,
        classes=classes,
        device=resolve_device(device),
        network=network,
        transforms=transforms,
        **semantic_options,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )


def load_instance(
    name: str,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    min_size: int = 800,
    max_size: int = 1333,
    batch_size: int = 8,
    precision: str = "auto",
    channels_last: bool | None = None,
) -> MaskRCNNModel:
    """``min_size`` / ``max_size``: Mask R-CNN's internal resize bounds (torchvision's
    defaults); detections come back at each image's own size."""
    check_thresholds(score_threshold, max_detections, mask_threshold)
    pretrained = get_model_weights(name).DEFAULT
    classes = pretrained.meta["categories"]
    state, source = _pretrained_state(name, pretrained, weights, sha256)
    # Thresholds also go into the network so it pastes masks only for kept detections.
    builder_options = {
        "num_classes": len(classes),
        "box_score_thresh": score_threshold,
        "box_detections_per_img": max_detections,
        "min_size": min_size,
        "max_size": max_size,
    }
    network = _build(name, builder_options, state, source)
    return MaskRCNNModel(
        name=name,
        classes=classes,
        device=resolve_device(device),
        network=network,
        score_threshold=score_threshold,
        max_detections=max_detections,
        mask_threshold=mask_threshold,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )


def _pretrained_state(
    name: str, pretrained: WeightsEnum, weights: str | Path | None, sha256: str | None
) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    if wants_random_weights(weights):
        return None, None
    if weights is not None:
        return read_state_dict(weights, sha256), Path(weights)
    path = hub_checkpoint_path(pretrained)
    if not path.is_file():
        raise MissingWeightsError(
            f"pretrained weights for {name} not found at {path} (segflow never downloads). "
            f"Provide them with weights=<file>, or place {pretrained.url} at that path "
            f"(the torch hub cache; TORCH_HOME moves it), or pass weights={RANDOM_WEIGHTS!r} "
            f"for random initialisation"
        )
    return read_state_dict(path, sha256), path


def _build(
    name: str,
    builder_options: dict[str, object],
    state: dict[str, torch.Tensor] | None,
    source: Path | None,
) -> torch.nn.Module:
    # weights=None and weights_backbone=None keep torchvision from downloading anything.
    network = get_model_builder(name)(weights=None, weights_backbone=None, **builder_options)
    if state is not None:
        apply_state_dict(network, state, source)
    return network
