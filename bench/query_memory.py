"""``segflow query`` on a run larger than its machine's memory should be: time and peak RSS.

A synthetic run is written with segflow's own store: ``--shards`` committed shards of
``--masks`` mask rows each (random blobs' COCO RLEs, ~300 characters of ``counts`` a row,
under other image ids in every shard), with empty metric tables. Then ``segflow query``
runs in a child process, twice: ``count(*)`` (no column read) and ``sum(length(counts))``
(the masks' largest column), and the child's wall time and peak RSS are printed, with the
size of the masks as Arrow tables in memory for comparison.

Run: ``python bench/query_memory.py [--shards 200] [--masks 12000]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segflow import rle, schema
from segflow.manifest import Shard
from segflow.store import RunStore

SEGFLOW = str(Path(sys.executable).with_name("segflow"))
QUERIES = ("SELECT count(*) FROM masks", "SELECT sum(length(counts)) FROM masks")


def masks_table(rows: int, rng: np.random.Generator) -> pa.Table:
    """``rows`` masks of 64 distinct random 256x256 blobs, repeated."""
    blobs = []
    for _ in range(64):
        mask = np.zeros((256, 256), np.uint8)
        for _ in range(8):
            y, x = rng.integers(0, 240, 2)
            mask[y : y + rng.integers(4, 16), x : x + rng.integers(4, 16)] = 1
        blobs.append(rle.encode(mask))
    counts = [blobs[i % len(blobs)]["counts"] for i in range(rows)]
    return pa.table(
        {
            "run_id": ["bench"] * rows,
            "image_id": np.arange(rows, dtype=np.int64) // 10,
            "uri": [f"s3://bench/images/{i // 10:08d}.jpg" for i in range(rows)],
            "instance": np.arange(rows, dtype=np.int32) % 10,
            "class_id": np.arange(rows, dtype=np.int32) % 80,
            "class_name": [f"class{i % 80}" for i in range(rows)],
            "score": rng.random(rows, dtype=np.float32),
            "bbox": [[0.0, 0.0, 16.0, 16.0]] * rows,
            "area": np.full(rows, 256, np.int64),
            "counts": counts,
            "height": np.full(rows, 256, np.int32),
            "width": np.full(rows, 256, np.int32),
            "model": ["bench"] * rows,
        },
        schema=schema.MASKS,
    )


def write_run(out: str, shards: int, rows: int) -> int:
    masks = masks_table(rows, np.random.default_rng(0))
    empty = {name: s.empty_table() for name, s in schema.TABLES.items() if name != "masks"}
    store = RunStore(out, "bench")
    store.prepare({"input": "bench"})
    for index in range(shards):
        ids = pc.add(masks.column("image_id"), pa.scalar(index * rows // 10, pa.int64()))
        shard_masks = masks.set_column(1, schema.MASKS.field("image_id"), ids)
        store.commit_shard(
            Shard(index, index * rows, (index + 1) * rows),
            empty | {"masks": shard_masks},
            {"shard": index, "images": rows // 10, "failed": 0, "masks": rows},
        )
    return masks.nbytes * shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--masks", type=int, default=12000, help="mask rows per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        in_memory = write_run(folder, args.shards, args.masks)
        print(
            f"{args.shards} shards, {args.shards * args.masks} mask rows, "
            f"{in_memory / 1e9:.2f} GB as Arrow tables"
        )
        for sql in QUERIES:
            start = time.perf_counter()
            subprocess.run([SEGFLOW, "query", folder, sql], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            # ru_maxrss of the children: the largest child so far, in KiB on Linux.
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            print(f"{sql:45} {seconds:6.1f} s   peak RSS so far {peak:.2f} GiB")


if __name__ == "__main__":
    main()
