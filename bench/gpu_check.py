"""GPU check: segflow's actor path on one GPU, in one script, for the day a GPU is lent.

Runs on a one-GPU machine that has torch, torchvision, pyarrow and Pillow but no Ray, Prefect
or pycocotools (``--wheels DIR`` puts unpacked or zipped pure/abi3 wheels, e.g. pycocotools',
on ``sys.path``). It calls what a segment actor calls, :func:`segflow.shard.segment_images`,
without Ray, and prints for each model, image size and precision:

- ``model img/s``: :meth:`predict` alone on decoded images already in host memory (the
  forward bound, host-to-device copy included);
- ``pipeline img/s``: the whole per-image path (read, decode, predict, RLE, rows), and the
  same with the JPEGs decoded on the GPU (``--decode gpu``);
- GPU utilisation over the pipeline phase (``nvidia-smi`` sampled every 200 ms) and host CPU
  use (process CPU seconds per wall second);
- CPU vs GPU JPEG decode img/s at 1080p;
- that RLE found on the device equals the CPU encoding of the same label maps and instance
  masks, byte for byte (and pycocotools' encoding where it imports).

Models: torchvision ``deeplabv3_resnet50`` and ``maskrcnn_resnet50_fpn_v2`` with random
weights (no hub here), and the demo U-Net with its trained weights (``models/demo``); when its
``.pt2`` does not load on the machine's torch, the U-Net is rebuilt from
:class:`segflow.models.unet.UNet` and the archive's raw weights.

``--dry`` runs the same code on the CPU with small images and few of them (the check that CI
can afford); without it the whole check is sized to stay under 8 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Regime:
    label: str
    width: int
    height: int
    images: int


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, small images: the code path only")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to put on sys.path")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.wheels is not None:
        sys.path[:0] = [str(p) for p in sorted(args.wheels.glob("*.whl"))] + [str(args.wheels)]
    sys.path.insert(0, str(ROOT))

    import torch

    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if not args.dry and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --dry for the CPU code path")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, {os.cpu_count()} CPUs", flush=True)
    if args.dry:
        regimes = [Regime("small", 128, 96, 2), Regime("wide", 256, 144, 2)]
        precisions = ["fp32"]  # segflow's CPU path is fp32 only
    else:
        regimes = [Regime("520px", 693, 520, 96), Regime("1080p", 1920, 1080, 48)]
        precisions = ["fp32", "bf16"]

    results: dict[str, object] = {"device": str(device), "rle_device_equals_cpu": {}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {r.label: write_corpus(Path(tmp) / r.label, r) for r in regimes}
        results["decode"] = decode_rates(corpora[regimes[-1].label], device)
        for spec in ("deeplabv3_resnet50", "maskrcnn_resnet50_fpn_v2", "aerial-unet"):
            for precision in precisions:
                for regime in regimes:
                    model = load(
                        spec, device, precision, batch_size=2 if args.dry else 16, dry=args.dry
                    )
                    run = measure(model, corpora[regime.label], device)
                    run |= {"model": spec, "precision": precision, "size": regime.label}
                    results["runs"].append(run)
                    print(format_run(run), flush=True)
                    if precision == "fp32" and regime is regimes[0]:
                        results["rle_device_equals_cpu"][spec] = check_rle(
                            model, corpora[regime.label]
                        )
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print("RLE on the device equals the CPU encoding:", results["rle_device_equals_cpu"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    if not all(results["rle_device_equals_cpu"].values()):
        raise SystemExit("device RLE differs from the CPU encoding")


def write_corpus(folder: Path, regime: Regime) -> list[str]:
    """JPEGs of smooth gradients with noise (something for the codec and the model to chew
    on; the check has no data of its own on a bare machine)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : regime.height, 0 : regime.width]
    uris = []
    for i in range(regime.images):
        base = np.stack(
            [(x * (i + 1)) % 256, (y * 2 + i * 7) % 256, ((x + y) // 3 + i * 13) % 256], axis=-1
        )
        noise = rng.integers(0, 40, base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        uris.append(str(path))
    return uris


def load(spec: str, device, precision: str, *, batch_size: int, dry: bool):
    from segflow.models.registry import load_model

    # A dry run shrinks the networks' own input resize (520 px, 800 px) to keep the CPU quick.
    small = {
        "deeplabv3_resnet50": {"resize_size": 96},
        "maskrcnn_resnet50_fpn_v2": {"min_size": 96, "max_size": 256},
    }
    if spec != "aerial-unet":
        return load_model(
            spec,
            device=device,
            weights="none",
            batch_size=batch_size,
            precision=precision,
            **(small[spec] if dry else {}),
        )
    path = ROOT / "models" / "demo" / "aerial_unet.pt2"
    try:
        return load_model(path, device=device, batch_size=batch_size, precision=precision)
    except Exception as error:  # an archive of a newer torch: rebuild from its raw weights
        print(f"  {path.name} does not load here ({type(error).__name__}: {error}); rebuilding")
        return rebuilt_unet(path, device, precision, batch_size)


def rebuilt_unet(path: Path, device, precision: str, batch_size: int):
    import torch

    from segflow.demo.train import _ClassLogits
    from segflow.models.card import read_card
    from segflow.models.exported import ExportedSemanticModel, LoadedProgram
    from segflow.models.unet import UNet

    card = read_card(path)
    with zipfile.ZipFile(path) as archive:
        prefix = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{prefix}/data/weights/model_weights_config.json"))
        state = {}
        for name, entry in config["config"].items():
            shape = [size["as_int"] for size in entry["tensor_meta"]["sizes"]]
            blob = bytearray(archive.read(f"{prefix}/data/weights/{entry['path_name']}"))
            state[name.removeprefix("network.")] = torch.frombuffer(
                blob, dtype=torch.float32
            ).reshape(shape)
    out_channels = (
        state["head.weight"].shape[0] if "head.weight" in state else len(card.classes) + 1
    )
    network = UNet(out_channels)
    network.load_state_dict(state, strict=True)
    module = _ClassLogits(network).eval().to(device)
    program = LoadedProgram(card, module, torch.device(device), card.min_size)
    return program.checked_model(ExportedSemanticModel, path, batch_size, precision)


def measure(model, uris: list[str], device) -> dict[str, float]:
    from segflow.decode import decode_image

    images = [decode_image(Path(uri).read_bytes()) for uri in uris]
    model.predict(images[: model.batch_size])  # warm-up: kernels, autotuning, allocator
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(images), model.batch_size):
        model.predict(images[start : start + model.batch_size])
    synchronize(device)
    model_rate = len(images) / (time.perf_counter() - started)

    sampler = GpuSampler() if device.type == "cuda" else None
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    pipeline(model, uris, decode_device=None)
    wall = time.perf_counter() - wall_before
    cpu = _cpu_seconds() - cpu_before
    utilisation = sampler.stop() if sampler is not None else None
    # --decode gpu: the JPEGs decoded by nvjpeg on the model's device (the CPU in a dry run).
    wall_before = time.perf_counter()
    pipeline(model, uris, decode_device=device)
    gpu_decode_wall = time.perf_counter() - wall_before
    return {
        "model_img_s": round(model_rate, 1),
        "pipeline_img_s": round(len(uris) / wall, 1),
        "pipeline_over_model": round(len(uris) / wall / model_rate, 3),
        "gpu_util_pct": utilisation,
        "host_cpus_busy": round(cpu / wall, 2),
        "pipeline_gpu_decode_img_s": round(len(uris) / gpu_decode_wall, 1),
    }


def pipeline(model, uris: list[str], *, decode_device) -> None:
    """What an actor does with a shard (segflow.shard.segment_images)."""
    from segflow.shard import segment_images

    result = segment_images(
        model,
        uris,
        run_id="gpu-check",
        batch_size=model.batch_size,
        prefetch_threads=max(2, (os.cpu_count() or 2) - 1),
        decode_device=decode_device,
    )
    if result.num_failed:
        raise SystemExit(
            f"{result.num_failed} images failed: {result.tables['errors'].to_pylist()}"
        )


def decode_rates(uris: list[str], device) -> dict[str, float]:
    """JPEG decode img/s on the CPU and, on a GPU, with nvjpeg (segflow.decode)."""
    from segflow.decode import decode_image

    blobs = [Path(uri).read_bytes() for uri in uris]
    rates = {}
    for where in ["cpu", *(["cuda"] if device.type == "cuda" else [])]:
        decode_image(blobs[0], device=where)
        synchronize(device)
        started = time.perf_counter()
        for blob in blobs:
            decode_image(blob, device=where)
        synchronize(device)
        rates[f"{where}_decode_img_s"] = round(len(blobs) / (time.perf_counter() - started), 1)
    print(f"JPEG decode of {len(blobs)} images: {rates}", flush=True)
    return rates


def check_rle(model, uris: list[str]) -> bool:
    """Device-side run finding against the CPU path on this model's own predictions."""
    from segflow import rle
    from segflow.decode import decode_image
    from segflow.prediction import SemanticPrediction

    images = [decode_image(Path(uri).read_bytes()) for uri in uris[:4]]
    same = True
    for prediction in model.predict(images):
        if isinstance(prediction, SemanticPrediction):
            on_device = rle.encode_label_map(prediction.labels)
            on_host = rle.encode_label_map(prediction.labels.cpu())
            same &= on_device == on_host
            reference = _pycocotools_label_map(prediction.labels.cpu().numpy())
        else:
            on_device = rle.encode_masks(prediction.masks)
            on_host = rle.encode_masks(prediction.masks.cpu())
            same &= on_device == on_host
            reference = _pycocotools_masks(prediction.masks.cpu().numpy())
        if reference is not None:
            host = on_host if isinstance(on_host, list) else [on_host[c] for c in sorted(on_host)]
            same &= [r["counts"] for r in host] == [r["counts"] for r in reference]
    return bool(same)


def _pycocotools_label_map(labels):
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return None
    import numpy as np

    return [
        coco_mask.encode(np.asfortranarray((labels == c).astype(np.uint8)))
        for c in np.unique(labels)
    ]


def _pycocotools_masks(masks):
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return None
    import numpy as np

    return [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]


class GpuSampler:
    """``nvidia-smi`` utilisation every 200 ms until :meth:`stop`; returns the mean, %."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._process = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self._samples.append(float(line))

    def stop(self) -> float | None:
        self._process.terminate()
        self._process.wait()
        self._reader.join(timeout=2)
        return round(sum(self._samples) / len(self._samples), 1) if self._samples else None


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def format_run(run: dict) -> str:
    return (
        f"{run['model']:<26} {run['precision']:<5} {run['size']:<6} "
        f"model {run['model_img_s']:>7} img/s  pipeline {run['pipeline_img_s']:>7} img/s "
        f"({run['pipeline_over_model']:.2f})  gpu {run['gpu_util_pct']}%  "
        f"host CPUs busy {run['host_cpus_busy']}  "
        f"pipeline with GPU decode {run['pipeline_gpu_decode_img_s']} img/s"
    )


if __name__ == "__main__":
    main()
