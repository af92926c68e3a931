"""Models of a user's own, for the tests: factories that ``--model tests.user_models:NAME``
imports on the driver and on every actor (the repository root is on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segflow.models.semantic import SemanticModel
from segflow.prediction import SemanticPrediction


class BrightnessModel:
    """Semantic: a pixel is ``light`` (1) where its mean channel value is above
    ``threshold``, else ``dark`` (0). Records the size of every batch it is given."""

    task = "semantic"
    classes = ("dark", "light")

    def __init__(self, device: torch.device, threshold: int) -> None:
        self.name = f"brightness>{threshold}"
        self.device = device
        self.threshold = threshold
        self.batches: list[int] = []

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[SemanticPrediction]:
        self.batches.append(len(images))
        return [
            SemanticPrediction(labels=brightness_labels(image, self.threshold)) for image in images
        ]


def brightness_labels(image: np.ndarray | torch.Tensor, threshold: int) -> torch.Tensor:
    pixels = torch.as_tensor(np.asarray(image)).float()
    return (pixels.mean(dim=-1) > threshold).to(torch.int64)


def make_brightness_model(*, device: torch.device, threshold: int = 100) -> BrightnessModel:
    return BrightnessModel(device, threshold)


class Incomplete:
    name = "incomplete"
    task = "semantic"


def make_incomplete(*, device: torch.device) -> Incomplete:
    return Incomplete()


def make_wrong_task(*, device: torch.device) -> BrightnessModel:
    model = BrightnessModel(device, 0)
    model.task = "panoptic"
    return model


NOT_CALLABLE = 42


class ChannelMixModel(SemanticModel):
    """Semantic, cheap and deterministic, for rasters too large for a real network in the
    tests: a fixed 1x1 mix of the 3x3-averaged RGB into 4 class logits. Its zero-padded
    average makes window edges differ from window middles, so blending counts. Tiled like
    every :class:`SemanticModel` (``tile_size``, ``tile_overlap``)."""

    MIX = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.4, 0.4, 0.4))

    def __init__(self, device: torch.device, **tiling) -> None:
        super().__init__(
            name="channel-mix", classes=("red", "green", "blue", "grey"), device=device, **tiling
        )
        self.mix = torch.tensor(self.MIX, device=device)[:, :, None, None]

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        averaged = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1)
        return torch.nn.functional.conv2d(averaged, self.mix)


def make_channel_mix_model(*, device: torch.device, **tiling) -> ChannelMixModel:
    return ChannelMixModel(device, **tiling)
