"""An emulated accelerator, as a segflow user model (``--model bench.emulated_device:model``).

Its forward pass costs ``ms_per_image`` milliseconds of wall time per image with the GIL
released (a sleep, as a CUDA synchronisation waits), and returns real label maps: ESPNet's
predictions of the CamVid validation frames (``../shared``), computed once and cached, taken
in turn and resized (nearest) to each image's size. So the host work segflow does after each
forward pass (RLE, areas, boxes, rows) is the work of real predictions, and the device's
cost is exactly known: the bound on a run's rate is ``min(1000 / ms_per_image, host rate)``.

With ``device_lock=PATH`` (``--model-option device_lock=/tmp/device.lock``) every process
whose model names the same file shares one emulated device: the sleep is taken under an
exclusive ``fcntl.flock`` of that file, as one GPU runs one process's kernels at a time, so
co-located actors (``--actors-per-gpu``) or several CPU actors queue for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from segflow.prediction import SemanticPrediction

SHARED = Path(os.environ.get("SEGFLOW_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ESPNET = SHARED / "models" / "espnet_camvid.pt2"
FRAMES = SHARED / "data" / "camvid_val" / "images"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segflow-bench"


class EmulatedDevice:
    """The segflow model protocol: ``name``, ``task``, ``classes``, ``predict``."""

    task = "semantic"

    def __init__(
        self,
        ms_per_image: float,
        labels: np.ndarray,
        classes: Sequence[str],
        device_lock: Path | None = None,
    ) -> None:
        self.name = f"emulated-{ms_per_image:g}ms"
        self.classes = tuple(classes)
        self.ms_per_image = ms_per_image
        self.device_lock = device_lock
        self._labels = labels  # (K, H, W) uint8
        self._next = 0
        self._resized: dict[tuple[int, int, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def predict(self, images: Sequence[torch.Tensor]) -> list[SemanticPrediction]:
        with self._device():
            time.sleep(self.ms_per_image * len(images) / 1e3)
        predictions = []
        for image in images:
            with self._lock:
                index, self._next = self._next, (self._next + 1) % len(self._labels)
            predictions.append(SemanticPrediction(labels=self._label_map(index, *image.shape[:2])))
        return predictions

    @contextlib.contextmanager
    def _device(self) -> Iterator[None]:
        """The device, to this process alone while the block runs (with ``device_lock``)."""
        if self.device_lock is None:
            yield
            return
        with open(self.device_lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _label_map(self, index: int, height: int, width: int) -> torch.Tensor:
        key = (index, height, width)
        if key not in self._resized:
            source = torch.from_numpy(self._labels[index])[None, None].float()
            resized = torch.nn.functional.interpolate(source, size=(height, width), mode="nearest")
            self._resized[key] = resized[0, 0].to(torch.int64)
        return self._resized[key]


def model(
    *,
    device: str = "cpu",
    ms_per_image: float | str = 0.0,
    size: str | None = None,
    device_lock: str | None = None,
    **_: object,
) -> EmulatedDevice:
    """The factory segflow calls (``device`` is ignored: nothing runs on a device). ``size``
    (``WIDTHxHEIGHT``, the corpus's) resizes every label map now, while the actor starts: a
    device hands back label maps at no cost to the host, and the resizing (15 ms a 1080p map)
    would otherwise be host work inside the first shards. ``device_lock``: see the module's
    doc."""
    labels, classes = espnet_predictions()
    lock = None if device_lock is None else Path(device_lock)
    emulated = EmulatedDevice(float(ms_per_image), labels, classes, lock)
    if size is not None:
        width, height = (int(side) for side in str(size).lower().split("x"))
        for index in range(len(labels)):
            emulated._label_map(index, height, width)
    return emulated


def espnet_predictions() -> tuple[np.ndarray, list[str]]:
    """ESPNet's label maps of the CamVid frames, cached under ``~/.cache/segflow-bench``
    keyed by the model file's hash (computed once, a few seconds on a CPU)."""
    from segflow.decode import decode_image
    from segflow.models.registry import load_model

    digest = hashlib.sha256(ESPNET.read_bytes()).hexdigest()[:16]
    cached = CACHE / f"espnet_camvid_labels_{digest}.npz"
    if not cached.is_file():
        espnet = load_model(ESPNET, device="cpu")
        frames = sorted(FRAMES.glob("*.png"))
        labels = [
            espnet.predict([decode_image(f.read_bytes())])[0].labels.numpy().astype(np.uint8)
            for f in frames
        ]
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.npz")
        np.savez_compressed(tmp, labels=np.stack(labels), classes=np.array(espnet.classes))
        tmp.replace(cached)
    with np.load(cached) as data:
        return data["labels"], data["classes"].tolist()
