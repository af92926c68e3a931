"""The Ray actor that segments shards: one model per actor, loaded once.

An actor runs up to :data:`CONCURRENT_SHARDS` shards at once, in threads, taking turns on
the model (one forward pass at a time, the older shard first: :mod:`segflow.turns`): while
one shard's last batches are encoded and its files written, and its result travels to the
driver, the next shard's images are already fetched and decoded and its forward passes
begin, so the device does not idle between shards.

An actor in which no image is done for ``stall_timeout`` seconds while it has shards ends
its process: whatever blocks it (a read past its timeout's reach, a forward pass that never
returns) cannot be interrupted from inside. Ray then restarts the actor and retries its
shards on it, a bounded number of times (:func:`workers.pool.segment_shards`). Progress is
the actor's, not a shard's: a shard waiting for its turn behind another's long forward pass
(a large raster's) is not stalled.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import ray
import torch

from segflow.allocator import retain_freed_memory
from segflow.decode import load_decoders
from segflow.groundtruth import ModelClasses, open_ground_truth
from segflow.job import Job
from segflow.manifest import Shard
from segflow.models.registry import load_job_model
from segflow.shard import segment_images
from segflow.store import RunStore, ShardFiles
from segflow.turns import DeviceTurns

# Two: the second shard fills the first's tail (its last host work, its writes, the round trip
# to the driver); more would only hold more images in memory.
CONCURRENT_SHARDS = 2


class SegmentActor:
    """Called with a run's store, a shard and its image URIs: segments them, writes the
    shard's files into the run's tables and returns what it wrote, for the driver to commit
    (:mod:`segflow.store`). Ray restarts a killed actor and retries its shard; a retry writes
    files of its own, and only one attempt's are ever committed."""

    def __init__(self, job: Job, *, device: str) -> None:
        """``job``: the run's resolved job (:func:`segflow.preflight.resolve_job`);
        ``device``: where this actor's model runs (its plan's, ``cpu`` or ``cuda``)."""
        retain_freed_memory()
        load_decoders()
        # A model file replaced since the run recorded its hash fails here, naming both.
        self.model = load_job_model(job, device=device)
        self.ground_truth = (
            None
            if job.gt is None
            else open_ground_truth(
                job.gt, ignore_index=job.ignore_index, model=ModelClasses.of(self.model)
            )
        )
        self.batch_size = job.batch_size
        self.prefetch_threads = job.prefetch_threads
        self.max_pixels = job.max_pixels
        self.read_timeout = job.read_timeout
        self.trimap_width = job.trimap_width
        self.raster_options = job.raster_options()
        self.device_turns = DeviceTurns()
        self.watchdog = StallWatchdog(job.stall_timeout)
        self.slicing = job.slicing()
        self.decode_device = _decode_device(job.decode, device)

    def __call__(self, store: RunStore, shard: Shard, uris: list[str]) -> ShardFiles:
        with self.watchdog.watching(shard):
            return self._segment(store, shard, uris, self.watchdog)

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
            forward_lock=self.device_turns.shard(),
            slicing=self.slicing,
            decode_device=self.decode_device,
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


def _decode_device(decode: str, device: str) -> torch.device | None:
    """Where the actor decodes JPEGs: its GPU when the job asks for GPU decoding and it has
    one (an actor without CUDA decodes on the CPU), else the CPU (None)."""
    if decode != "gpu" or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.device(device)


class StallWatchdog:
    """Exits the process when shards are open (:meth:`watching`) and :meth:`progress` has
    not been called for ``seconds`` (``None``: never)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._last = time.monotonic()
        self._open: set[int] = set()  # indexes of the shards being segmented
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def progress(self) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def watching(self, shard: Shard) -> Iterator[None]:
        with self._lock:
            if not self._open:
                self._last = time.monotonic()  # an idle actor's wait is not a stall
            self._open.add(shard.index)
            if self.seconds is not None and self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, args=(self.seconds,), name="stall watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._open.discard(shard.index)

    def _watch(self, seconds: float) -> None:
        while True:
            time.sleep(min(1.0, seconds / 4))
            with self._lock:
                shards = sorted(self._open)
                idle = time.monotonic() - self._last
            if shards and idle >= seconds:
                for index in shards:
                    print(
                        f"segflow: shard {index}: nothing done for {idle:.0f} s (stall "
                        f"timeout {seconds:g} s); ending this actor so that Ray retries its "
                        "shards",
                        file=sys.stderr,
                        flush=True,
                    )
                os._exit(STALLED_EXIT_STATUS)


STALLED_EXIT_STATUS = 75  # EX_TEMPFAIL: the shard may pass on another try
