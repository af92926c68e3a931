"""The Ray actor that segments shards: one model per actor, loaded once.

A shard that makes no progress (no image done) for ``stall_timeout`` seconds ends its
actor's process: whatever blocks it (a read past its timeout's reach, a forward pass that
never returns) cannot be interrupted from inside. Ray then restarts the actor and retries
the shard on it, a bounded number of times (:func:`workers.pool.segment_shards`).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import ray

from segflow.allocator import retain_freed_memory
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard
from segflow.models import load_model
from segflow.raster import RasterOptions
from segflow.shard import segment_images
from segflow.store import RunStore

DEFAULT_STALL_TIMEOUT = 600.0


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
        read_timeout: float | None,
        stall_timeout: float | None,
        raster: RasterOptions | None = None,
    ) -> None:
        retain_freed_memory()
        # A model file replaced since the run recorded its hash fails here, naming both.
        self.model = load_model(model, device=device, sha256=model_sha256, **model_options)
        self.ground_truth = None if gt is None else open_ground_truth(gt, ignore_index=ignore_index)
        self.batch_size = batch_size
        self.prefetch_threads = prefetch_threads
        self.max_pixels = max_pixels
        self.read_timeout = read_timeout
        self.stall_timeout = stall_timeout
        self.raster = raster

    def __call__(self, store: RunStore, shard: Shard, uris: list[str]) -> dict[str, Any]:
        with StallWatchdog(shard, self.stall_timeout) as watchdog:
            return self._segment(store, shard, uris, watchdog)

    def _segment(
        self, store: RunStore, shard: Shard, uris: list[str], watchdog: StallWatchdog
    ) -> dict[str, Any]:
        started_at = time.time()
        result = segment_images(
            self.model,
            uris,
            run_id=store.run_id,
            batch_size=self.batch_size,
            prefetch_threads=self.prefetch_threads,
            max_pixels=self.max_pixels,
            read_timeout=self.read_timeout,
            ground_truth=self.ground_truth,
            on_progress=watchdog.progress,
            raster_options=self.raster,
        )
        watchdog.progress()  # the commit gets a stall timeout of its own
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


class StallWatchdog:
    """While open, exits the process when :meth:`progress` has not been called for
    ``seconds`` (``None``: never)."""

    def __init__(self, shard: Shard, seconds: float | None) -> None:
        self.shard = shard
        self.seconds = seconds
        self._last = time.monotonic()
        self._closed = threading.Event()

    def progress(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> StallWatchdog:
        if self.seconds is not None:
            watch = threading.Thread(
                target=self._watch, args=(self.seconds,), name="stall watchdog", daemon=True
            )
            watch.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closed.set()

    def _watch(self, seconds: float) -> None:
        while not self._closed.wait(min(1.0, seconds / 4)):
            idle = time.monotonic() - self._last
            if idle >= seconds:
                print(
                    f"segflow: shard {self.shard.index}: nothing done for {idle:.0f} s (stall "
                    f"timeout {seconds:g} s); ending this actor so that Ray retries the "
                    "shard",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(STALLED_EXIT_STATUS)


STALLED_EXIT_STATUS = 75  # EX_TEMPFAIL: the shard may pass on another try
