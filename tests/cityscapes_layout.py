"""A small generated dataset in Cityscapes' layout, for the Cityscapes tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segflow import cityscapes

CITIES = ("bonn", "ulm")
SIZE = (128, 256)  # height, width


@dataclass(frozen=True)
class Frame:
    image: Path  # leftImg8bit/val/CITY/X_leftImg8bit.png, the prediction's train ids in red
    label_ids: Path  # gtFine/val/CITY/X_gtFine_labelIds.png
    instance_ids: Path  # gtFine/val/CITY/X_gtFine_instanceIds.png
    prediction: Path  # pred/X.png: label ids, as cityscapesScripts reads predictions
    train_ids: np.ndarray  # the prediction's train ids


def _blobs(rng: np.random.Generator, canvas: np.ndarray, value, count: int) -> list[np.ndarray]:
    """``count`` random rectangles painted on ``canvas`` with ``value(i)``; their masks."""
    height, width = canvas.shape
    masks = []
    for i in range(count):
        h, w = rng.integers(6, height // 2), rng.integers(6, width // 3)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        canvas[y : y + h, x : x + w] = value(i)
        masks.append(canvas == value(i))
    return masks


def write_dataset(root: Path, frames: int = 5, seed: int = 0) -> list[Frame]:
    """``frames`` images over :data:`CITIES`: label ids of every label (ignored ones included),
    car and person (and one caravan, an ignored class with instances) instances, and a noisy
    prediction of each."""
    rng = np.random.default_rng(seed)
    label_ids = [label.label_id for label in cityscapes.LABELS if label.label_id >= 0]
    to_label = {train: label for label, train in cityscapes.TRAIN_IDS.items()}
    written = []
    for i in range(frames):
        city = CITIES[i % len(CITIES)]
        name = f"{city}_{i:06d}_000019"
        labels = np.full(SIZE, 7, np.int64)  # road
        for value in rng.choice(label_ids, 8, replace=False):
            _blobs(rng, labels, lambda _, v=value: v, 1)
        instances = labels.copy()
        for label_id, count in ((26, 3), (24, 4), (29, 1)):
            masks = _blobs(rng, instances, lambda k, b=label_id: b * 1000 + k, count)
            for k, mask in enumerate(masks):
                labels[mask & (instances == label_id * 1000 + k)] = label_id
        # A crowd region: the label id alone in the instance file.
        _blobs(rng, instances, lambda _: 26, 1)
        labels[instances == 26] = 26
        train = np.vectorize(lambda v: cityscapes.TRAIN_IDS.get(int(v), 0))(labels)
        noise = rng.random(SIZE) < 0.2
        train = np.where(noise, rng.integers(0, 19, SIZE), train)
        predicted = np.vectorize(to_label.get)(train)
        pixels = rng.integers(0, 255, SIZE)
        paths = []
        for folder, suffix, array, mode in (
            ("leftImg8bit", "_leftImg8bit.png", np.dstack([train, pixels, pixels]), np.uint8),
            ("gtFine", "_gtFine_labelIds.png", labels, np.uint8),
            ("gtFine", "_gtFine_instanceIds.png", instances, np.uint16),
        ):
            path = root / folder / "val" / city / f"{name}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(mode)).save(path)
            paths.append(path)
        prediction = root / "pred" / f"{name}.png"
        prediction.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(predicted.astype(np.uint8)).save(prediction)
        written.append(Frame(*paths, prediction, train))
    return written
