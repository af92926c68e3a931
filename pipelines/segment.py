"""The ``segment`` flow: list a corpus, shard it, run the shards on Ray actors, summarise.

Prefect sees three tasks per run (plan, run the shards, finish), never one per image: its
server slows down with thousands of task runs, and Ray already schedules, retries and
restarts at shard level. Rerunning the same command resumes: committed shards are skipped.

Two flows, both named ``segment``, run a :class:`~segflow.job.Job`: :func:`segment` takes the
job's fields as JSON-able parameters (a deployment's, Python's keywords) and builds the job;
:func:`segment_job` takes a job whole (the command line's, already checked).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

import segflow
from segflow.errors import RunIncompleteError, SegflowError
from segflow.job import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREFETCH_THREADS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_SHARD_SIZE,
    DEFAULT_STALL_TIMEOUT,
    Job,
)
from segflow.manifest import Shard, build_manifest, shards
from segflow.metrics.boundary import TRIMAP_WIDTH
from segflow.preflight import CheckedJob, check_job, resolve_job
from segflow.store import RunStore
from workers.cluster import connect
from workers.pool import Workers, claim, discard_prestart, prestart, segment_shards


@dataclass(frozen=True)
class Plan:
    store: RunStore
    images: int  # the manifest's length; shards read their URIs from the store's copy
    pending: list[Shard]
    total_shards: int
    resumed: bool


def _retry_unless(*final: type[Exception]) -> Callable[[Any, Any, Any], bool]:
    """A retry condition: retry what may pass on a second try (a flaky store), not a failure
    of the ``final`` kinds, which would only fail again later."""

    def worth_retrying(task, task_run, state) -> bool:
        try:
            state.result()
        except final:
            return False
        except Exception:
            return True
        return False

    return worth_retrying


# Not a bad input or a conflicting run.
_transient = _retry_unless(SegflowError, ValueError, ImportError)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def plan_run(
    input: str,
    out: str,
    run_id: str,
    config: dict[str, Any],
    evaluation: dict[str, Any] | None,
) -> Plan:
    logger = get_run_logger()
    store = RunStore(out, run_id)
    resumed = store.exists()
    if resumed:
        store.prepare(config)  # raises if the existing run has another configuration
    if not (resumed and store.has_manifest()):
        with tempfile.TemporaryDirectory(prefix="segflow-manifest-") as tmp:
            listed = os.path.join(tmp, "manifest.parquet")
            build_manifest(input, listed)  # a bad input fails here, before anything is written
            store.prepare(config)
            store.put_manifest(listed)
    with store.open_manifest() as manifest:
        images = len(manifest)
    if evaluation is not None:
        store.write_json("evaluation.json", evaluation)
    all_shards = list(shards(images, config["shard_size"]))
    done = store.committed()
    pending = [s for s in all_shards if s.index not in done]
    logger.info(
        "run %s: %d images in %d shards, %d already committed",
        run_id,
        images,
        len(all_shards),
        len(all_shards) - len(pending),
    )
    return Plan(store, images, pending, len(all_shards), resumed)


# A retry re-reads the commits, so it runs only the shards the failed attempt left undone;
# not after a shard failed each of its attempts on Ray.
@task(
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_unless(RunIncompleteError),
)
def run_shards(
    plan: Plan,
    job: Job,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    done = plan.store.committed()
    pending = [shard for shard in plan.pending if shard.index not in done]
    if not pending:
        return []
    # The pool asks for a shard's URIs as an actor frees up, so the driver holds a few
    # shards' worth, never the manifest. Opened first: a store that fails here leaves no
    # actors running.
    manifest = plan.store.open_manifest()
    workers = claim(job, len(pending))
    get_run_logger().info(
        "%d actor(s), %s CPU and %s GPU each",
        len(workers.actors),
        workers.plan.num_cpus,
        workers.plan.num_gpus,
    )
    summaries = []
    try:
        for summary in segment_shards(workers, plan.store, manifest, pending, job):
            summaries.append(summary)
            if on_shard is not None:
                on_shard(summary)
    finally:
        workers.stop()
        manifest.close()
    return summaries


@task(cache_policy=NONE)
def finish_run(plan: Plan, run_now: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    shard_summaries = plan.store.shard_summaries()
    summary = {
        "run_id": plan.store.run_id,
        "output": plan.store.uri,
        "segflow_version": segflow.__version__,
        "shards": plan.total_shards,
        "shards_run_now": len(run_now),
        "images": sum(s["images"] for s in shard_summaries),
        "failed": sum(s["failed"] for s in shard_summaries),
        "not_evaluated": sum(s["not_evaluated"] for s in shard_summaries),
        "masks": sum(s["masks"] for s in shard_summaries),
        "seconds": round(seconds, 3),
        "images_per_second": round(sum(s["images"] for s in run_now) / seconds, 3),
    }
    if len(shard_summaries) != plan.total_shards:
        committed = f"{len(shard_summaries)} of {plan.total_shards}"
        raise RunIncompleteError(f"run {plan.store.run_id}: only {committed} shards are committed")
    plan.store.finish(summary)
    create_markdown_artifact(
        key=f"segment-run-{plan.store.run_id}".lower().replace("_", "-"),
        markdown="\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary.items())]),
        description=f"segflow segment run {plan.store.run_id}",
    )
    return summary


@flow(name="segment", log_prints=True)
def segment(
    input: str,
    model: str,
    out: str,
    *,
    run_id: str | None = None,
    gt: str | None = None,
    ignore_index: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    model_sha256: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = "auto",
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    soft_metrics: bool = False,
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    max_detections: int | None = None,
    trimap_width: int = TRIMAP_WIDTH,
    bands: list[int] | None = None,
    rescale: str | None = None,
    slice_size: int | None = None,
    slice_overlap: int | None = None,
    slice_merge: str | None = None,
    slice_match: float | None = None,
    model_options: dict[str, Any] | None = None,
    ray_address: str | None = None,
    device: str = "auto",
    decode: str = "cpu",
    prefetch_threads: int = DEFAULT_PREFETCH_THREADS,
    cpus_per_actor: float | None = None,
    actors_per_gpu: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    on_plan: Callable[[Plan], None] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input`` with ``model`` into ``out``; returns the run summary.

    The parameters are the fields of :class:`~segflow.job.Job` (see there), JSON-able, as a
    deployment gives them; the job is built from them and checked before any work.
    ``on_plan`` and ``on_shard`` let a caller follow the run.
    """
    # The parameters, every one a job field (tests/test_job.py holds the two lists equal).
    parameters = {k: v for k, v in locals().items() if k not in ("on_plan", "on_shard")}
    return _segment(check_job(Job.from_parameters(parameters)), on_plan, on_shard)


@flow(name="segment", log_prints=True)
def segment_job(
    job: Job | CheckedJob,
    on_plan: Callable[[Plan], None] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """:func:`segment` for a job whole: checked now, unless it is a :class:`CheckedJob`
    (the command line checks it before starting Ray and Prefect)."""
    return _segment(job if isinstance(job, CheckedJob) else check_job(job), on_plan, on_shard)


def _segment(
    checked: CheckedJob,
    on_plan: Callable[[Plan], None] | None,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        connect(checked.job.ray_address)
        plan = plan_run(
            checked.job.input, checked.out, checked.run_id, checked.config, checked.evaluation
        )
        if on_plan is not None:
            on_plan(plan)
        run_now = run_shards(plan, checked.job, on_shard)
        return finish_run(plan, run_now, time.perf_counter() - started)
    finally:
        discard_prestart()


def prestart_segment(job: Job) -> Workers:
    """Before running ``job`` (:func:`segment_job`, or :func:`segment` with its parameters):
    connect to Ray and start the actors loading the model, which then overlaps Prefect's
    start-up, the flow's checks and the run's planning. The flow takes the actors over."""
    return prestart(resolve_job(job))
