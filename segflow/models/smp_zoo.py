"""segmentation_models_pytorch architectures (optional extra ``smp``), weights from local files.

Encoders are never initialised from downloaded weights: a trained model's state dict
holds the encoder too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import segmentation_models_pytorch
import torch

from segflow.models.errors import MissingWeightsError
from segflow.models.geometry import logits_at_input_size
from segflow.models.runtime import prepare_module, resolve_device
from segflow.models.semantic import SemanticModel
from segflow.models.weights import (
    RANDOM_WEIGHTS,
    apply_state_dict,
    read_state_dict,
    wants_random_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmpModel(SemanticModel):
    def __init__(
        self,
        *,
        network: torch.nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        **options,
    ):
        super().__init__(**options)
        self.network = prepare_module(network, self.device, self.memory_format)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # smp states whether an architecture needs sides divisible by the encoder's stride.
        self.size_multiple = (
            network.encoder.output_stride if network.requires_divisible_input_shape else None
        )

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        # Padding after normalisation: the zero border is the mean colour, the network's
        # most neutral input.
        normalised = (images.float().div(255) - self.mean) / self.std
        return logits_at_input_size(self.network, normalised, size_multiple=self.size_multiple)


def load(
    name: str,
    *,
    classes: int | Sequence[str],
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
    encoder: str = "resnet34",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 8,
    precision: str = "auto",
    channels_last: bool | None = None,
    **semantic_options,
) -> SmpModel:
    """``name`` is ``smp:<Architecture>``; ``classes`` a count or the class names in id order;
    ``weights`` a state dict file, or ``"none"`` for random initialisation."""
    class_names = _class_names(classes)
    for option, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ValueError(f"{option} must have 3 values (R, G, B), got {values!r}")
    if weights is None:
        raise MissingWeightsError(
            f"{name} needs weights=<state dict file>, or weights={RANDOM_WEIGHTS!r} "
            f"for random initialisation (segflow never downloads encoder weights)"
        )
    network = segmentation_models_pytorch.create_model(
        name.removeprefix("smp:"),
        encoder_name=encoder,
        encoder_weights=None,
        classes=len(class_names),
    )
    if not wants_random_weights(weights):
        apply_state_dict(network, read_state_dict(weights, sha256), Path(weights))
    return SmpModel(
        name=name,
        classes=class_names,
        device=resolve_device(device),
        network=network,
        mean=mean,
        std=std,
        **semantic_options,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )


def _class_names(classes: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, int) and not isinstance(classes, bool):
        if classes < 1:
            raise ValueError(f"classes must be a positive count or a list of names, got {classes}")
        return tuple(f"class_{index}" for index in range(classes))
    if (
        isinstance(classes, str)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise ValueError(f"classes must be a positive count or a list of names, got {classes!r}")
    return tuple(classes)
