"""The segmentation actors of a run, which can be started before the run needs them.

Starting an actor takes seconds: its process imports torch and loads the model. The CLI
calls :func:`prestart` before the flow, so that the actors' start-up overlaps Prefect's
server start, the flow's checks and the run's planning; the flow then :func:`claim` s them.
A flow called without a prestart (a deployment, a test) starts its actors itself.

The actors hold only the model and the ground truth: each shard's call carries its image
URIs and the run it belongs to. Nothing an actor's constructor needs lives in Ray's object
store, so Ray can always restart a killed actor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from segflow.errors import RunIncompleteError
from segflow.manifest import ManifestReader, Shard
from segflow.raster import RasterOptions
from segflow.store import RunStore
from workers.cluster import ActorPlan, connect, plan_actors
from workers.segment_actor import SegmentActor

# Attempts at a shard whose actor dies under it (a stall, see workers.segment_actor, or a
# crash): one that fails every time would fail again, and must not hold the run forever.
SHARD_ATTEMPTS = 3


@dataclass(frozen=True)
class WorkerConfig:
    """What a segmentation actor is made with; a prestarted pool serves a run only when
    its configuration is the run's."""

    model: str
    device: str
    model_options: tuple[tuple[str, Any], ...]
    model_sha256: str | None  # the model file every actor must load (None: it reads none)
    batch_size: int
    prefetch_threads: int
    max_pixels: int | None
    gt: str | None
    ignore_index: int | None
    cpus_per_actor: float | None
    read_timeout: float | None
    stall_timeout: float | None
    raster: RasterOptions | None = None


@dataclass
class Workers:
    """A pool's actors, and what each reserves."""

    plan: ActorPlan
    actors: list[ActorHandle]

    def stop(self) -> None:
        """Free the actors' GPUs and memory now: a driver on a long-lived cluster may go on
        to other work."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def start_workers(config: WorkerConfig, max_actors: int | None = None) -> Workers:
    """Create the actors (their constructors run in the background on the cluster)."""
    plan = plan_actors(max_actors, device=config.device, cpus_per_actor=config.cpus_per_actor)
    remote_actor = ray.remote(SegmentActor).options(
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        # Ray's fault tolerance: a dead actor is restarted and its shard retried on it (as
        # many times as segment_shards allows).
        max_restarts=-1,
        max_task_retries=-1,
    )
    actors = [
        remote_actor.remote(
            model=config.model,
            device=plan.device,
            model_options=dict(config.model_options),
            model_sha256=config.model_sha256,
            batch_size=config.batch_size,
            prefetch_threads=config.prefetch_threads,
            max_pixels=config.max_pixels,
            gt=config.gt,
            ignore_index=config.ignore_index,
            read_timeout=config.read_timeout,
            stall_timeout=config.stall_timeout,
            raster=config.raster,
        )
        for _ in range(plan.actors)
    ]
    return Workers(plan, actors)


def segment_shards(
    workers: Workers,
    store: RunStore,
    manifest: ManifestReader,
    shards: list[Shard],
    config: WorkerConfig,
) -> Iterator[dict[str, Any]]:
    """Run ``shards`` on the pool's actors, one at a time each, and yield each shard's summary
    once it is committed. A shard whose actor died on each of its :data:`SHARD_ATTEMPTS`
    attempts fails the run (:class:`RunIncompleteError`); shards committed so far stay."""
    idle = list(workers.actors)
    waiting = deque(shards)
    running: dict[ray.ObjectRef, tuple[ActorHandle, Shard]] = {}
    while waiting or running:
        while idle and waiting:
            actor, shard = idle.pop(), waiting.popleft()
            call = actor.__call__.options(max_task_retries=SHARD_ATTEMPTS - 1)
            running[call.remote(store, shard, manifest.uris(shard))] = (actor, shard)
        [done], _ = ray.wait(list(running), num_returns=1)
        actor, shard = running.pop(done)
        try:
            summary = ray.get(done)
        except RayActorError as exc:
            if exc.actor_init_failed:
                # Its constructor raised (a model file replaced since the run recorded its
                # hash, say): the message ends with that error, after Ray's traceback.
                cause = str(exc).strip().splitlines()[-1].strip()
                raise RunIncompleteError(f"{shard.name} did not run: {cause}") from exc
            first = manifest.uris(shard)[0]
            raise RunIncompleteError(_died_every_time(shard, first, config)) from exc
        idle.append(actor)
        yield summary


def _died_every_time(shard: Shard, first_uri: str, config: WorkerConfig) -> str:
    stall = (
        f"an actor ends itself when no image of its shard is done for {config.stall_timeout:g} s"
        " (the stall timeout), or it crashed"
        if config.stall_timeout is not None
        else "it crashed"
    )
    return (
        f"{shard.name} (images {shard.start} to {shard.stop - 1}, from {first_uri}) "
        f"did not finish: its actor died on each of {SHARD_ATTEMPTS} attempts ({stall}); "
        "the shards committed are kept, and rerunning the same command resumes"
    )


_prestarted: tuple[WorkerConfig, Workers] | None = None


def prestart(ray_address: str | None, config: WorkerConfig) -> Workers:
    """Connect to Ray and create a pool for ``config``, kept for :func:`claim`; the actors'
    constructors (imports, model load) run on the cluster while the caller goes on.

    This blocks while a local Ray starts: Ray ties the lifetime of the processes it starts
    to the thread that starts them (Linux's parent-death signal is per thread), so that
    must be a thread that lives as long as Ray, such as the main one.
    """
    global _prestarted
    connect(ray_address)
    workers = start_workers(config)
    discard_prestart()
    _prestarted = (config, workers)
    return workers


def discard_prestart() -> None:
    """Stop a prestarted pool that no run claimed (nothing left to run, or the run failed
    first)."""
    global _prestarted
    if _prestarted is not None:
        _prestarted[1].stop()
        _prestarted = None


def claim(config: WorkerConfig, shards: int) -> Workers:
    """Actors for ``shards`` shards: the prestarted pool when it was made for ``config``,
    trimmed to what the shards can use, else a new pool."""
    global _prestarted
    prestarted, _prestarted = _prestarted, None
    if prestarted is not None:
        prestarted_config, workers = prestarted
        if prestarted_config == config:
            surplus = workers.actors[shards:]
            workers.actors = workers.actors[:shards]
            Workers(workers.plan, surplus).stop()
            return workers
        workers.stop()
    return start_workers(config, max_actors=shards)
