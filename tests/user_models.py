"""Models of a user's own, for the tests: factories that ``--model tests.user_models:NAME``
imports on the driver and on every actor (the repository root is on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from segflow.models.semantic import SemanticModel
from segflow.prediction import InstancePrediction, SemanticPrediction


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


class BlobModel:
    """Instance: one ``blob`` per object it sees, where an object's pixels have blue 255
    and its id in red + 256 * green (a planted object is one id). What a detector gives: the
    mask and box of what the image shows of the object, cut at the image's edge, scored 0.9
    when whole and 0.6 when it touches the edge (a cut view is less certain). Records the
    size of every image it is given, and of every batch."""

    task = "instance"
    classes = ("blob",)

    def __init__(self, device: torch.device) -> None:
        self.name = "blobs"
        self.device = device
        self.sizes: list[tuple[int, int]] = []
        self.batches: list[int] = []

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[InstancePrediction]:
        self.batches.append(len(images))
        return [self._detect(np.asarray(image)) for image in images]

    def _detect(self, image: np.ndarray) -> InstancePrediction:
        height, width = image.shape[:2]
        self.sizes.append((height, width))
        ids = np.where(
            image[..., 2] == 255,
            image[..., 0].astype(np.int64) + 256 * image[..., 1].astype(np.int64),
            -1,
        )
        found = np.unique(ids[ids >= 0])
        masks = torch.from_numpy(ids[None] == found[:, None, None])
        boxes, scores = [], []
        for mask in masks.numpy():
            ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            boxes.append([xs[0], ys[0], xs[-1] + 1 - xs[0], ys[-1] + 1 - ys[0]])
            cut = ys[0] == 0 or xs[0] == 0 or ys[-1] == height - 1 or xs[-1] == width - 1
            scores.append(0.6 if cut else 0.9)
        order = np.argsort(-np.array(scores), kind="stable")
        return InstancePrediction(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)[order],
            labels=torch.zeros(len(found), dtype=torch.int64),
            scores=torch.tensor(scores, dtype=torch.float32)[order],
            masks=masks[order],
        )


def make_blob_model(*, device: torch.device) -> BlobModel:
    return BlobModel(device)


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
