"""Does segflow keep an accelerator fed? The emulated device, through the real command.

``bench/emulated_device.py`` is a user model whose forward pass costs X ms per image of wall
time with the GIL released, as a GPU's would, and returns real label maps. Each measurement
is a real ``segflow segment`` (its own Ray and Prefect, one actor holding both CPUs:
``--cpus-per-actor 2``) over CamVid frames as 480×360 PNG or upscaled to 1080p JPEG, for X in
{0, 2, 5, 10, 20} ms. For each it prints:

- img/s at work: images over first shard start to last shard end (the shard summaries), so
  the command's fixed start-up is left out;
- the bound: min(1000 / X, host capacity), host capacity being the rate at X = 0;
- their ratio. Goals: >= 0.95 at every X >= 5 ms, >= 0.85 at the crossover (the X nearest
  to where 1000 / X meets the host capacity).

Then host capacity (X = 0) with one CPU (the whole command under ``taskset -c 0``,
``--cpus-per-actor 1``) against two: goal >= 1.8x.

Usage: .venv/bin/python bench/device_feed.py [--formats png,jpeg] [--ms 0,2,5,10,20]
       [--seconds 12]   (each run holds about that many seconds of work)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGFLOW_SHARED", ROOT.parent / "shared"))
SEGFLOW = str(Path(sys.executable).with_name("segflow"))
SIZES = {"png": None, "jpeg": (1920, 1080)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="png,jpeg")
    parser.add_argument("--ms", default="0,2,5,10,20")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prefetch-threads", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.emulated_device import espnet_predictions

    espnet_predictions()  # computed once here, not inside the first timed run
    costs = [float(x) for x in args.ms.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            frames = originals(Path(tmp) / f"{fmt}-frames", fmt)
            print(f"\n{fmt}: {Image.open(frames[0]).size[0]}x{Image.open(frames[0]).size[1]}")
            # Host capacity first: it sizes the other runs and is the bound's second term.
            work = Path(tmp)
            rough = at_work(fmt, frames, work, 0.0, 2, args, images=512)
            capacity = at_work(fmt, frames, work, 0.0, 2, args, images=_count(rough, 0, args))
            print(f"{'X ms/img':>9} {'img/s at work':>14} {'bound':>8} {'ratio':>6}")
            crossover = min(costs, key=lambda x: abs(1000 / x - capacity) if x else float("inf"))
            for x in costs:
                count = _count(capacity, x, args)
                rate = capacity if x == 0 else at_work(fmt, frames, work, x, 2, args, images=count)
                bound = capacity if x == 0 else min(1000 / x, capacity)
                goal = 0.85 if x == crossover else 0.95 if x >= 5 else None
                met = goal is not None and rate / bound >= goal
                verdict = "" if goal is None else "  ok" if met else f"  below {goal}"
                mark = " (crossover)" if x == crossover else ""
                print(f"{x:>9g} {rate:>14.1f} {bound:>8.1f} {rate / bound:>6.2f}{verdict}{mark}")
            one = at_work(fmt, frames, work, 0.0, 1, args, images=_count(capacity / 2, 0, args))
            print(
                f"host capacity: 1 CPU {one:.1f} img/s, 2 CPUs {capacity:.1f} img/s: "
                f"{capacity / one:.2f}x (goal >= 1.8)"
            )


def _count(rate: float, ms: float, args: argparse.Namespace) -> int:
    bound = rate if ms == 0 else min(rate, 1000 / ms)
    return max(256, int(bound * args.seconds) // 64 * 64)


def originals(folder: Path, fmt: str) -> list[Path]:
    """The CamVid frames, as PNG at their own size or as 1080p JPEG."""
    folder.mkdir(parents=True)
    frames = sorted((SHARED / "data" / "camvid_val" / "images").glob("*.png"))
    if SIZES[fmt] is None:
        return frames
    written = []
    for frame in frames:
        target = folder / f"{frame.stem}.jpg"
        Image.open(frame).convert("RGB").resize(SIZES[fmt], Image.BICUBIC).save(target, quality=90)
        written.append(target)
    return written


def at_work(
    fmt: str, frames: list[Path], tmp: Path, ms: float, cpus: int, args, *, images: int
) -> float:
    """img/s of one real ``segflow segment`` over ``images`` links to ``frames``, from the
    first shard's start to the last shard's end."""
    from segflow.store import RunStore

    corpus = tmp / f"{fmt}-{ms:g}-{cpus}-{images}"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(images):  # hard links: distinct URIs, the same bytes on disk
            os.link(frames[i % len(frames)], corpus / f"{i:06d}{frames[0].suffix}")
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [SEGFLOW, "segment", str(corpus), "--out", str(out), "--run-id", "feed"]
    width, height = Image.open(frames[0]).size
    command += ["--model", "bench.emulated_device:model", "--model-option", f"ms_per_image={ms}"]
    command += ["--model-option", f"size={width}x{height}"]
    command += ["--shard-size", "256", "--batch-size", str(args.batch_size)]
    command += ["--prefetch-threads", str(args.prefetch_threads), "--cpus-per-actor", str(cpus)]
    if cpus == 1:
        command = ["taskset", "-c", "0", *command]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(completed.stdout[-3000:] + completed.stderr[-3000:])
    shards = RunStore(str(out), "feed").shard_summaries()
    busy = max(s["finished_at"] for s in shards) - min(s["started_at"] for s in shards)
    return sum(s["images"] for s in shards) / busy


if __name__ == "__main__":
    main()
