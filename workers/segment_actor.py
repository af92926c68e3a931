"""The Ray actor that segments shards: one model per actor, loaded once."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray

from segflow.allocator import retain_freed_memory
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard
from segflow.models import load_model
from segflow.shard import segment_images
from segflow.store import RunStore


class SegmentActor:
    """Called with a run's store, a shard and its image URIs: segments them, commits the
    shard's tables into the run and returns the shard summary. Ray restarts a killed actor
    and retries its shard; the commit protocol (:mod:`segflow.store`) makes the retry
    overwrite rather than duplicate."""

    def __init__(
        self,
        *,
        model: str,
        device: str,
        model_options: dict[str, Any],
        model_sha256: str | None,
        batch_size: int,
        prefetch_threads: int,
        max_pixels: int | None,
        gt: str | None,
        ignore_index: int | None,
    ) -> None:
        retain_freed_memory()
        # A model file replaced since the run recorded its hash fails here, naming both.
        self.model = load_model(model, device=device, sha256=model_sha256, **model_options)
        self.ground_truth = None if gt is None else open_ground_truth(gt, ignore_index=ignore_index)
        self.batch_size = batch_size
        self.prefetch_threads = prefetch_threads
        self.max_pixels = max_pixels

    def __call__(self, store: RunStore, shard: Shard, uris: list[str]) -> dict[str, Any]:
        started_at = time.time()
        result = segment_images(
            self.model,
            uris,
            run_id=store.run_id,
            batch_size=self.batch_size,
            prefetch_threads=self.prefetch_threads,
            max_pixels=self.max_pixels,
            ground_truth=self.ground_truth,
        )
        summary = {
            "shard": shard.index,
            "images": result.num_images,
            "failed": result.num_failed,
            "not_evaluated": result.num_not_evaluated,
            "masks": result.tables["masks"].num_rows,
            "seconds": round(result.seconds, 3),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "node": ray.get_runtime_context().get_node_id(),
            "started_at": started_at,
            "finished_at": time.time(),
        }
        store.commit_shard(shard, result.tables, summary)
        return summary
