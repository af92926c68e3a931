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
from segflow.job import Job, JobError
from segflow.manifest import ManifestReader, Shard
from segflow.store import RunStore
from workers.cluster import ActorPlan, connect, plan_actors
from workers.segment_actor import CONCURRENT_SHARDS, SegmentActor

# Attempts at a shard whose actor dies under it (a stall, see workers.segment_actor, or a
# crash): one that fails every time would fail again, and must not hold the run forever.
SHARD_ATTEMPTS = 3


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


def start_workers(job: Job, max_actors: int | None = None) -> Workers:
    """Create the actors of ``job`` (resolved: :func:`segflow.preflight.resolve_job`); their
    constructors run in the background on the cluster."""
    plan = _plan(job, max_actors)
    if job.precision == "fp16" and plan.device == "cpu":
        raise JobError(
            "--precision fp16 needs a GPU, and the Ray cluster has none: use fp32 or bf16"
        )
    if job.decode == "gpu" and plan.device == "cpu":
        raise JobError("--decode gpu needs a GPU, and the Ray cluster has none: use cpu")
    remote_actor = ray.remote(SegmentActor).options(
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        # Ray's fault tolerance: a dead actor is restarted and its shard retried on it (as
        # many times as segment_shards allows).
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=CONCURRENT_SHARDS,
    )
    actors = [remote_actor.remote(job, device=plan.device) for _ in range(plan.actors)]
    return Workers(plan, actors)


def _plan(job: Job, max_actors: int | None) -> ActorPlan:
    return plan_actors(
        max_actors,
        device=job.device,
        cpus_per_actor=job.cpus_per_actor,
        actors_per_gpu=job.actors_per_gpu,
    )


def segment_shards(
    workers: Workers,
    store: RunStore,
    manifest: ManifestReader,
    shards: list[Shard],
    job: Job,
) -> Iterator[dict[str, Any]]:
    """Run ``shards`` on the pool's actors, up to :data:`CONCURRENT_SHARDS` at a time each,
    commit each shard's files here, in the driver (the run's tables' single writer), and
    yield its summary. A shard whose actor died on each of its :data:`SHARD_ATTEMPTS`
    attempts fails the run (:class:`RunIncompleteError`); shards committed so far stay."""
    actors = workers.actors
    load = [0] * len(actors)  # shards running on each actor
    waiting = deque(shards)
    running: dict[ray.ObjectRef, tuple[int, Shard]] = {}

    def dispatch() -> None:
        while waiting:
            i = min(range(len(actors)), key=load.__getitem__)
            # An actor's second shard only while no actor would go without one: at the end
            # of the run a shard queued behind another must not wait while an actor idles.
            if load[i] >= CONCURRENT_SHARDS or (load[i] and len(waiting) < len(actors)):
                return
            shard = waiting.popleft()
            load[i] += 1
            call = actors[i].__call__.options(max_task_retries=SHARD_ATTEMPTS - 1)
            running[call.remote(store, shard, manifest.uris(shard))] = (i, shard)

    while waiting or running:
        dispatch()
        [done], _ = ray.wait(list(running), num_returns=1)
        i, shard = running.pop(done)
        try:
            written = ray.get(done)
        except RayActorError as exc:
            if exc.actor_init_failed:
                # Its constructor raised (a model file replaced since the run recorded its
                # hash, say): the message ends with that error, after Ray's traceback.
                cause = str(exc).strip().splitlines()[-1].strip()
                raise RunIncompleteError(f"{shard.name} did not run: {cause}") from exc
            first = manifest.uris(shard)[0]
            raise RunIncompleteError(_died_every_time(shard, first, job)) from exc
        load[i] -= 1
        dispatch()  # the actor's next shard runs while the driver commits this one
        store.commit(written)
        yield dict(written.summary)


def _died_every_time(shard: Shard, first_uri: str, job: Job) -> str:
    stall = (
        f"an actor ends itself when no image of its shards is done for {job.stall_timeout:g} s"
        " (the stall timeout), or it crashed"
        if job.stall_timeout is not None
        else "it crashed"
    )
    return (
        f"{shard.name} (images {shard.start} to {shard.stop - 1}, from {first_uri}) "
        f"did not finish: its actor died on each of {SHARD_ATTEMPTS} attempts ({stall}); "
        "the shards committed are kept, and rerunning the same command resumes"
    )


_prestarted: tuple[Job, Workers] | None = None


def prestart(job: Job) -> Workers:
    """Connect to Ray and create a pool for ``job`` (resolved), kept for :func:`claim`; the
    actors' constructors (imports, model load) run on the cluster while the caller goes on.

    This blocks while a local Ray starts: Ray ties the lifetime of the processes it starts
    to the thread that starts them (Linux's parent-death signal is per thread), so that
    must be a thread that lives as long as Ray, such as the main one.
    """
    global _prestarted
    connect(job.ray_address)
    workers = start_workers(job)
    discard_prestart()
    _prestarted = (job, workers)
    return workers


def discard_prestart() -> None:
    """Stop a prestarted pool that no run claimed (nothing left to run, or the run failed
    first)."""
    global _prestarted
    if _prestarted is not None:
        _prestarted[1].stop()
        _prestarted = None


def claim(job: Job, shards: int) -> Workers:
    """Actors for ``shards`` shards: the prestarted pool when it was made for ``job``,
    trimmed to what the shards can use, else a new pool. Not a pool of actors sharing GPUs
    for fewer shards than it shares them between: trimmed, it would leave GPUs idle
    (:func:`workers.cluster.plan_actors`)."""
    global _prestarted
    prestarted, _prestarted = _prestarted, None
    if prestarted is not None:
        prestarted_job, workers = prestarted
        if prestarted_job == job and _plan(job, shards).num_gpus == workers.plan.num_gpus:
            surplus = workers.actors[shards:]
            workers.actors = workers.actors[:shards]
            Workers(workers.plan, surplus).stop()
            return workers
        workers.stop()
    return start_workers(job, max_actors=shards)
