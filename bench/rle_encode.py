"""Throughput of segflow.rle encoding against pycocotools, on the same inputs in one process.

Semantic: segflow ``encode_label_map`` vs pycocotools the usual way (classes present from a
bincount, then for each a binary mask -> ``np.asfortranarray`` -> ``mask.encode``), on
synthetic 1024x1024 label maps with 19 classes (Voronoi regions) and on the CamVid
validation labels in the shared data.
Instance: ``encode_masks`` on an (N, H, W) batch vs pycocotools on the same masks, once with
the (H, W, N) Fortran uint8 copy that pycocotools needs counted and once without.
Outputs are checked to be identical before anything is timed.

Run: ``python bench/rle_encode.py`` (shared data: $SEGFLOW_SHARED, default ../shared).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco

from segflow import rle

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0
ROUNDS = 5


def shared_root() -> Path:
    return Path(os.environ.get("SEGFLOW_SHARED", REPO_ROOT.parent / "shared")).resolve()


def voronoi_label_maps(count: int, size: int, classes: int, seeds: int) -> list[np.ndarray]:
    """Label maps whose regions are the Voronoi cells of random seeds, each seed a random
    class (every class used): large convex blobs like a driving-scene segmentation."""
    gen = np.random.default_rng(SEED)
    rows, cols = np.mgrid[0:size, 0:size]
    maps = []
    for _ in range(count):
        points = gen.uniform(0, size, (seeds, 2))
        seed_class = gen.permutation(np.resize(np.arange(classes), seeds))
        nearest = np.full((size, size), np.inf)
        labels = np.zeros((size, size), np.int64)  # int64, as an argmax over logits gives
        for (y, x), c in zip(points, seed_class, strict=True):
            distance = (rows - y) ** 2 + (cols - x) ** 2
            closer = distance < nearest
            nearest[closer], labels[closer] = distance[closer], c
        maps.append(labels)
    return maps


def instance_masks(count: int, height: int, width: int) -> np.ndarray:
    """Random filled ellipses, (N, H, W) bool, as a mask head's thresholded output."""
    gen = np.random.default_rng(SEED)
    rows, cols = np.mgrid[0:height, 0:width]
    centre = gen.uniform((0, 0), (height, width), (count, 2))
    radii = gen.uniform(10, 150, (count, 2))
    return (((rows - centre[:, 0, None, None]) / radii[:, 0, None, None]) ** 2) + (
        ((cols - centre[:, 1, None, None]) / radii[:, 1, None, None]) ** 2
    ) <= 1


def coco_label_map(labels: np.ndarray, ignore_index: int | None) -> dict[int, dict]:
    # bincount finds the classes present several times faster than np.unique.
    present = np.flatnonzero(np.bincount(labels.reshape(-1)))
    return {
        int(c): coco.encode(np.asfortranarray(labels == c, dtype=np.uint8))
        for c in present
        if c != ignore_index
    }


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def compare(title: str, images: int, ours: Callable[[], object], theirs: Callable[[], object]):
    if ours() != theirs():
        sys.exit(f"{title}: segflow and pycocotools outputs differ")
    # Alternate the two sides so that both see the same machine load; keep each one's best.
    rounds = [(seconds(ours), seconds(theirs)) for _ in range(ROUNDS)]
    ours_s, theirs_s = (min(column) for column in zip(*rounds, strict=True))
    print(f"{title}")
    print(f"  segflow      {images / ours_s:9.1f} img/s")
    print(f"  pycocotools  {images / theirs_s:9.1f} img/s")
    print(f"  speed-up     {theirs_s / ours_s:9.2f}x   (outputs identical)")


def main() -> None:
    print(f"numpy {np.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"best of {ROUNDS} alternating runs per side; both sides encode the same inputs\n")

    synthetic = voronoi_label_maps(count=8, size=1024, classes=19, seeds=64)
    compare(
        "semantic: 8 synthetic 1024x1024 label maps, 19 classes (Voronoi cells of 64 seeds, "
        f"seed {SEED}), int64",
        len(synthetic),
        lambda: [rle.encode_label_map(m) for m in synthetic],
        lambda: [coco_label_map(m, None) for m in synthetic],
    )
    tensors = [torch.from_numpy(m) for m in synthetic]
    compare(
        "semantic: the same maps as CPU torch tensors (segflow side only; pycocotools on numpy)",
        len(tensors),
        lambda: [rle.encode_label_map(t) for t in tensors],
        lambda: [coco_label_map(m, None) for m in synthetic],
    )

    label_dir = shared_root() / "data" / "camvid_val" / "labels"
    paths = sorted(label_dir.glob("*.png"))
    if paths:
        camvid = [np.array(Image.open(p)) for p in paths]
        h, w = camvid[0].shape
        compare(
            f"semantic: {len(camvid)} CamVid val label maps {w}x{h}, uint8, void (11) ignored",
            len(camvid),
            lambda: [rle.encode_label_map(m, ignore_index=11) for m in camvid],
            lambda: [coco_label_map(m, 11) for m in camvid],
        )
    else:
        print(f"semantic: CamVid labels not found in {label_dir} (set SEGFLOW_SHARED); skipped")

    masks = instance_masks(50, 480, 640)
    fortran = np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8)
    print()
    compare(
        "instance: 50 masks 480x640 (bool ellipses) per image; pycocotools incl. the (H, W, N) "
        "Fortran uint8 copy it needs",
        1,
        lambda: rle.encode_masks(masks),
        lambda: coco.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8)),
    )
    compare(
        "instance: the same, pycocotools given the Fortran copy for free",
        1,
        lambda: rle.encode_masks(masks),
        lambda: coco.encode(fortran),
    )


if __name__ == "__main__":
    main()
