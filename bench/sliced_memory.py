"""Memory of sliced instance inference: N objects on a SIDE x SIDE GeoTIFF.

    python bench/sliced_memory.py [--side 10000] [--objects 100] [--merge mask-iou|nms]

Writes a tiled, deflate-compressed GeoTIFF with N discs (radius 30 to 150 px, many centred
on the slice edges and corners of 1024-px slices overlapping by 128), runs the test suite's
``BlobModel`` (one detection per object a slice shows, as a detector cut at the slice edge)
over it slice by slice (:mod:`segflow.slicing`), and prints the detections, the largest crop
held, the process's RSS growth over the run (GDAL's block cache included: set
``GDAL_CACHEMAX`` to bound it), numpy's traced peak, and what N full-size planes would take.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' BlobModel

from segflow import raster, slicing
from tests.user_models import BlobModel

SLICE, OVERLAP, BLOCK = 1024, 128, 1024


def write_discs(path: Path, side: int, n: int) -> None:
    rng = np.random.default_rng(0)
    edges = np.arange(SLICE - OVERLAP, side, SLICE - OVERLAP)
    on_edge = rng.choice(edges, (2, n)) + rng.integers(-60, 60, (2, n))
    anywhere = rng.integers(200, side - 200, (2, n))
    ys = np.where(np.arange(n) % 2 == 0, on_edge[0], anywhere[0])
    xs = np.where(np.arange(n) % 3 == 0, on_edge[1], anywhere[1])
    radius = rng.integers(30, 150, n)
    profile = {
        "driver": "GTiff",
        "height": side,
        "width": side,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0, 500000.0, 0, -0.5, 4650000.0),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as out:
        for top in range(0, side, BLOCK):
            for left in range(0, side, BLOCK):
                h, w = min(BLOCK, side - top), min(BLOCK, side - left)
                block = np.full((3, h, w), 40, np.uint8)
                rows, columns = np.mgrid[top : top + h, left : left + w]
                near = (np.abs(ys - (top + h / 2)) <= h / 2 + radius) & (
                    np.abs(xs - (left + w / 2)) <= w / 2 + radius
                )
                for i in np.flatnonzero(near):  # a later disc covers an earlier one
                    where = (rows - ys[i]) ** 2 + (columns - xs[i]) ** 2 <= radius[i] ** 2
                    block[0][where], block[1][where], block[2][where] = (
                        (i + 1) % 256,
                        (i + 1) // 256,
                        255,
                    )
                out.write(block, window=Window(left, top, w, h))


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=10_000)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--merge", choices=slicing.MERGES, default="mask-iou")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the writer's own process
    args = parser.parse_args()
    if args.write:
        write_discs(Path(args.write), args.side, args.objects)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "discs.tif"
        # Written in a process of its own, so that this one's peak RSS is the run's.
        writer = [sys.executable, __file__, "--write", str(path)]
        subprocess.run(
            [*writer, "--side", str(args.side), "--objects", str(args.objects)], check=True
        )
        source = raster.open_raster(str(path), raster.RasterOptions())
        settings = slicing.Slicing(SLICE, OVERLAP, args.merge)
        model = BlobModel(torch.device("cpu"))
        windows = settings.windows(args.side, args.side)
        before = rss_mib()
        tracemalloc.start()
        started = time.perf_counter()
        held = slicing.detect_slices(model, slicing.raster_reader(source), windows)
        merged = slicing.merge_detections(held, windows, settings)
        found = slicing.encoded(merged, args.side, args.side)
        seconds = time.perf_counter() - started
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        source.close()
    planes = len(found) * args.side * args.side / 2**30
    print(f"{args.side} x {args.side}, {len(windows)} slices, merge {args.merge}")
    print(f"views {len(held)} -> detections {len(found)} in {seconds:.1f} s")
    print(f"largest crop held: {max(d.mask.size for d in held + merged):,} px")
    print(
        f"crops held: {sum(d.mask.nbytes for d in held) / 2**20:.1f} MiB of views, "
        f"{sum(d.mask.nbytes for d in merged) / 2**20:.1f} MiB merged"
    )
    print(f"RSS growth over the run: {peak - before:.0f} MiB; numpy traced peak {traced:.0f} MiB")
    print(f"{len(found)} full-size bool planes would be {planes:.1f} GiB")


if __name__ == "__main__":
    main()
