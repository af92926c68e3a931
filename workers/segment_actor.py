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

import ray

from segflow.allocator import retain_freed_memory
from segflow.groundtruth import open_ground_truth
from segflow.job import Job
from segflow.manifest import Shard
from segflow.models.registry import load_job_model
from segflow.shard import segment_images
from segflow.store import RunStore, ShardFiles


class SegmentActor:
    """Called with a run's store, a shard and its image URIs: segments them, writes the
    shard's files into the run's tables and returns what it wrote, for the driver to commit
    (:mod:`segflow.store`). Ray restarts a killed actor and retries its shard; a retry writes
    files of its own, and only one attempt's are ever committed."""

    def __init__(self, job: Job, *, device: str) -> None:
        """``job``: the run's resolved job (:func:`segflow.preflight.resolve_job`);
        ``device``: where this actor's model runs (its plan's, ``cpu`` or ``cuda``)."""
        retain_freed_memory()
        # A model file replaced since the run recorded its hash fails here, naming both.
        self.model = load_job_model(job, device=device)
        self.ground_truth = (
            None if job.gt is None else open_ground_truth(job.gt, ignore_index=job.ignore_index)
        )
        self.batch_size = job.batch_size
        self.prefetch_threads = job.prefetch_threads
        self.max_pixels = job.max_pixels
        self.read_timeout = job.read_timeout
        self.stall_timeout = job.stall_timeout
        self.trimap_width = job.trimap_width
        self.raster_options = job.raster_options()
        self.slicing = job.slicing()

    def __call__(self, store: RunStore, shard: Shard, uris: list[str]) -> ShardFiles:
        with StallWatchdog(shard, self.stall_timeout) as watchdog:
            return self._segment(store, shard, uris, watchdog)

    def _segment(
        self, store: RunStore, shard: Shard, uris: list[str], watchdog: StallWatchdog
    ) -> ShardFiles:
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
            trimap_width=self.trimap_width,
            on_progress=watchdog.progress,
            raster_options=self.raster_options,
            slicing=self.slicing,
        )
        watchdog.progress()  # the writes get a stall timeout of their own
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
        return store.write_shard(shard, result.tables, summary)


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
