"""CPU throughput of espnet_camvid exported as .pt2 (torch.export) vs .onnx (onnxruntime).

Both run through segflow's own ``load_model(...).predict`` on the same CamVid frames, so the
figures include what a worker pays per image (pad, forward, argmax), not the bare graph.
One warm-up call per model, then one timed run over all frames; the ratio is what to read,
as absolute rates depend on the machine and its load.

    python bench/model_forward.py [--frames 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segflow.models import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared")).resolve()
BATCH_SIZES = (1, 8)


def images_per_second(model_path: Path, frames: list[np.ndarray], batch_size: int) -> float:
    model = load_model(model_path, device="cpu", batch_size=batch_size)
    model.predict(frames[:batch_size])
    start = time.perf_counter()
    model.predict(frames)
    return len(frames) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="CamVid frames per timed run")
    args = parser.parse_args()
    frame_dir = SHARED / "data" / "camvid_val" / "images"
    model_stem = SHARED / "models" / "espnet_camvid"
    if not frame_dir.is_dir():
        print(f"shared data not found at {SHARED} (set SEGFLOW_SHARED)", file=sys.stderr)
        return 1
    paths = sorted(frame_dir.glob("*.png"))[: args.frames]
    frames = [np.array(Image.open(path).convert("RGB")) for path in paths]
    height, width = frames[0].shape[:2]
    print(
        f"espnet_camvid on CPU, {len(frames)} frames of {width}x{height}, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    for batch_size in BATCH_SIZES:
        pt2 = images_per_second(model_stem.with_suffix(".pt2"), frames, batch_size)
        onnx = images_per_second(model_stem.with_suffix(".onnx"), frames, batch_size)
        print(
            f"batch {batch_size}: pt2 {pt2:6.2f} img/s | onnx {onnx:6.2f} img/s | "
            f"onnx/pt2 {onnx / pt2:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
