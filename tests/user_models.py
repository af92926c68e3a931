"""Models of a user's own, for the tests: factories that ``--model tests.user_models:NAME``
imports on the driver and on every actor (the repository root is on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

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


class TurnTakingModel(BrightnessModel):
    """:class:`BrightnessModel` whose forward pass holds the device ``seconds`` (the GIL
    released, as a GPU's synchronisation does) and appends ``pid start end`` of each pass to
    the file ``log``."""

    def __init__(self, device: torch.device, log: str, seconds: float) -> None:
        super().__init__(device, 100)
        self.log, self.seconds = log, seconds

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[SemanticPrediction]:
        start = time.time()
        time.sleep(self.seconds)
        predictions = super().predict(images)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {start!r} {time.time()!r}\n")
        return predictions


def make_turn_taking_model(
    *, device: torch.device, log: str, seconds: float = 0.05
) -> TurnTakingModel:
    return TurnTakingModel(device, log, seconds)
