"""Slices of a large run: ``segflow evaluate RUN --where SQL`` over 100k per-image rows.

Two synthetic runs are written with segflow's own store (100 committed shards of 1000
images each), with the tables the workers write:

- semantic: 11 classes, ``class_stats`` and ``confusion`` rows of random integer counts
  (5 classes present per image);
- instance: the COCOeval records of 2000 generated images (``bench/coco_map.py``'s data,
  evaluated per image by ``CocoEvaluator``), repeated 50 times under other image ids:
  about 1M detection rows per IoU type.

Timed: ``evaluate_run`` over the whole run and over a 10% slice (``uri LIKE ...``), which
reads the committed shards' metric tables, filters in DuckDB and reduces the integer state;
no image or mask is read. The semantic slice is checked against numpy sums of the same rows.

Run: ``python bench/evaluate_slice.py [--images 100000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from coco_map import CATEGORIES, generate

from segflow import schema
from segflow.evaluation import evaluate_run
from segflow.manifest import Shard
from segflow.metrics.semantic import SemanticScores
from segflow.store import RunStore

SHARD = 1000
CLASSES = 11
REGIONS = 10
SLICE = "uri LIKE '%/region=3/%'"


def images_table(run_id: str, ids: np.ndarray, uris: list[str], gt_uris: list[str]) -> pa.Table:
    n = len(ids)
    columns = {
        "run_id": [run_id] * n,
        "image_id": ids,
        "uri": uris,
        "status": ["ok"] * n,
        "height": np.full(n, 360, np.int32),
        "width": np.full(n, 480, np.int32),
        "num_masks": np.full(n, 5, np.int32),
        "model": ["bench"] * n,
        "processed_at": [datetime.now(UTC)] * n,
        "gt_uri": gt_uris,
    }
    return pa.table(
        [
            pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
            for f in schema.IMAGES
        ],
        schema=schema.IMAGES,
    )


def table(name: str, columns: dict) -> pa.Table:
    table_schema = schema.TABLES[name]
    return pa.table([pa.array(columns[f.name], f.type) for f in table_schema], schema=table_schema)


def empty(name: str) -> pa.Table:
    return schema.TABLES[name].empty_table()


def uris_for(ids: range) -> list[str]:
    return [f"s3://bench/region={i % REGIONS}/image-{i:07d}.jpg" for i in ids]


def write_semantic(out: str, n_images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    store = RunStore(out, "semantic")
    store.prepare({"bench": "semantic"})
    totals = {k: np.zeros(CLASSES, np.int64) for k in ("gt", "pred", "tp")}
    for index, start in enumerate(range(0, n_images, SHARD)):
        ids = range(start, min(start + SHARD, n_images))
        n = len(ids)
        present = np.stack([rng.choice(CLASSES, 5, replace=False) for _ in ids])  # (n, 5)
        cells = rng.integers(0, 20000, (n, 5, 5)) * (rng.random((n, 5, 5)) < 0.4)
        cells[:, np.arange(5), np.arange(5)] += rng.integers(1000, 50000, (n, 5))
        gt_class = np.repeat(present, 5, axis=1)
        pred_class = np.tile(present, (1, 5))
        image_ids = np.repeat(np.arange(start, start + n), 25)
        keep = cells.reshape(-1) > 0
        confusion = {
            "run_id": ["semantic"] * int(keep.sum()),
            "image_id": image_ids[keep],
            "gt_class": gt_class.reshape(-1)[keep],
            "pred_class": pred_class.reshape(-1)[keep],
            "pixels": cells.reshape(-1)[keep],
        }
        gt_pixels = cells.sum(axis=2)
        pred_pixels = cells.sum(axis=1)
        tp = cells[:, np.arange(5), np.arange(5)]
        class_stats = {
            "run_id": ["semantic"] * (n * 5),
            "image_id": np.repeat(np.arange(start, start + n), 5),
            "class_id": present.reshape(-1),
            "class_name": [f"class{c}" for c in present.reshape(-1)],
            "gt_pixels": gt_pixels.reshape(-1),
            "pred_pixels": pred_pixels.reshape(-1),
            "intersection": tp.reshape(-1),
            "union": (gt_pixels + pred_pixels - tp).reshape(-1),
            "boundary_intersection": (tp // 10).reshape(-1),
            "boundary_union": ((gt_pixels + pred_pixels - tp) // 8).reshape(-1),
            "trimap_intersection": (tp // 6).reshape(-1),
            "trimap_union": ((gt_pixels + pred_pixels - tp) // 5).reshape(-1),
            "soft_intersection": [None] * (n * 5),
            "soft_union": [None] * (n * 5),
            "soft_squared_union": [None] * (n * 5),
        }
        in_slice = np.array([i % REGIONS == 3 for i in ids])
        for key, values in (("gt", gt_pixels), ("pred", pred_pixels), ("tp", tp)):
            np.add.at(totals[key], present[in_slice].reshape(-1), values[in_slice].reshape(-1))
        uris = uris_for(ids)
        store.commit_shard(
            Shard(index, start, start + n),
            {
                "masks": empty("masks"),
                "images": images_table("semantic", np.arange(start, start + n), uris, uris),
                "errors": empty("errors"),
                "class_stats": table("class_stats", class_stats),
                "confusion": table("confusion", confusion),
                "coco_detections": empty("coco_detections"),
                "coco_ground_truth": empty("coco_ground_truth"),
            },
            {"shard": index},
        )
    store.write_json(
        "evaluation.json",
        {
            "task": "semantic",
            "classes": [f"class{c}" for c in range(CLASSES)],
            "gt": "bench",
            "ignore_index": None,
            "categories": {},
        },
    )
    return totals


def instance_records(n_base: int) -> dict[str, dict[str, np.ndarray]]:
    from segflow.metrics.instance import CocoEvaluator

    dataset, results = generate(n_base, (1, 3))
    per_image: dict[int, tuple[list, list]] = {image["id"]: ([], []) for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        per_image[annotation["image_id"]][0].append(annotation)
    for result in results:
        per_image[result["image_id"]][1].append(result)
    sizes = {image["id"]: (image["height"], image["width"]) for image in dataset["images"]}
    records = {}
    for iou_type in ("segm", "bbox"):
        evaluator = CocoEvaluator(iou_type, CATEGORIES)
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        for image_id, (gts, dts) in per_image.items():
            dts = [{k: v for k, v in d.items() if k != drop} for d in dts]
            evaluator.update(
                image_id, gts, dts, height=sizes[image_id][0], width=sizes[image_id][1]
            )
        records[iou_type] = evaluator.state()
    return records


def write_instance(out: str, n_images: int, n_base: int) -> None:
    store = RunStore(out, "instance")
    store.prepare({"bench": "instance"})
    records = instance_records(n_base)
    for index, start in enumerate(range(0, n_images, SHARD)):
        n = min(SHARD, n_images - start)
        ids = np.arange(start, start + n)
        tables: dict[str, list[dict]] = {"detections": [], "ground_truth": []}
        for iou_type, state in records.items():
            for name, parts in tables.items():
                rows = state[name]
                # Base image k (1-based) stands for images start + (k - 1) of this shard.
                keep = rows["image_id"] <= n
                gt_ids = rows["image_id"][keep] - 1 + start + 1
                parts.append(
                    {
                        **{c: v[keep] for c, v in rows.items() if c != "image_id"},
                        "image_id": gt_ids - 1,
                        "gt_image_id": gt_ids,
                        "iou_type": [iou_type] * int(keep.sum()),
                        "run_id": ["instance"] * int(keep.sum()),
                    }
                )
        merged = {
            name: {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in parts[0]}
            for name, parts in tables.items()
        }
        uris = uris_for(range(start, start + n))
        store.commit_shard(
            Shard(index, start, start + n),
            {
                "masks": empty("masks"),
                "images": images_table(
                    "instance", ids, uris, [f"bench.json#image_id={i + 1}" for i in ids]
                ),
                "errors": empty("errors"),
                "class_stats": empty("class_stats"),
                "confusion": empty("confusion"),
                "coco_detections": table("coco_detections", merged["detections"]),
                "coco_ground_truth": table("coco_ground_truth", merged["ground_truth"]),
            },
            {"shard": index},
        )
    store.write_json(
        "evaluation.json",
        {
            "task": "instance",
            "classes": [str(c) for c in CATEGORIES],
            "gt": "coco:bench.json",
            "ignore_index": None,
            "categories": {str(c): str(c) for c in CATEGORIES},
        },
    )


def timed(location: str, where: str | None) -> tuple[dict, float]:
    start = time.perf_counter()
    result = evaluate_run(location, where=where)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        totals = write_semantic(out + "/semantic", args.images, rng)
        write_instance(out + "/instance", args.images, n_base=SHARD)
        print(f"wrote 2 runs of {args.images} images in {time.perf_counter() - start:.1f} s")
        print(f"{'run':10} {'images':>8} {'all (s)':>8} {'slice (s)':>10} {'slice images':>13}")
        for kind in ("semantic", "instance"):
            whole, whole_seconds = timed(f"{out}/{kind}", None)
            part, part_seconds = timed(f"{out}/{kind}", SLICE)
            print(
                f"{kind:10} {whole['images']['evaluated']:>8} {whole_seconds:>8.2f} "
                f"{part_seconds:>10.2f} {part['images']['evaluated']:>13}"
            )
            if kind == "semantic":
                expected = SemanticScores.from_counts(totals["gt"], totals["pred"], totals["tp"])
                print(
                    f"  slice mIoU {part['semantic']['miou']:.6f}, numpy sums {expected.miou:.6f}"
                )
                assert part["semantic"]["miou"] == expected.miou
            else:
                print(
                    f"  segm AP all {whole['instance']['segm']['stats'][0]:.6f}, "
                    f"slice {part['instance']['segm']['stats'][0]:.6f}"
                )


if __name__ == "__main__":
    main()
