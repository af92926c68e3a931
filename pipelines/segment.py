"""The ``segment`` flow: list a corpus, shard it, run the shards on Ray actors, summarise.

Prefect sees three tasks per run (plan, run the shards, finish), never one per image: its
server slows down with thousands of task runs, and Ray already schedules, retries and
restarts at shard level. Rerunning the same command resumes: committed shards are skipped.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

import segflow
from segflow.decode import DEFAULT_MAX_PIXELS
from segflow.errors import RunIncompleteError, SegflowError
from segflow.manifest import Shard, build_manifest, shards
from segflow.preflight import CheckedJob, check_segment_job, recorded_sha256
from segflow.raster import RasterOptions
from segflow.shard import DEFAULT_READ_TIMEOUT
from segflow.store import RunStore
from workers.cluster import connect
from workers.pool import (
    WorkerConfig,
    Workers,
    claim,
    discard_prestart,
    prestart,
    segment_shards,
)
from workers.segment_actor import DEFAULT_STALL_TIMEOUT

DEFAULT_SHARD_SIZE = 256


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
    config: WorkerConfig,
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
    workers = claim(config, len(pending))
    get_run_logger().info(
        "%d actor(s), %s CPU and %s GPU each",
        len(workers.actors),
        workers.plan.num_cpus,
        workers.plan.num_gpus,
    )
    summaries = []
    try:
        for summary in segment_shards(workers, plan.store, manifest, pending, config):
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
    batch_size: int = 8,
    ray_address: str | None = None,
    device: str = "auto",
    model_options: dict[str, Any] | None = None,
    model_sha256: str | None = None,
    prefetch_threads: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cpus_per_actor: float | None = None,
    checked: CheckedJob | None = None,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    raster: RasterOptions | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input`` with ``model`` into ``out``; returns the run summary.

    ``checked``: what :func:`~segflow.preflight.check_segment_job` returned for these same
    arguments, where the caller checked the job already (the CLI, before starting Ray and
    Prefect). ``model_sha256`` pins the model file (:func:`segflow.models.model_file`); by
    default its hash is taken now, and the driver and every actor load only a file of that
    hash. A read that takes longer than ``read_timeout`` seconds fails its image; a shard
    with no image done for ``stall_timeout`` seconds is retried, and fails the run after its
    last attempt (``None``: no limit). ``on_plan`` and ``on_shard`` let a caller (the CLI's
    progress bar) follow the run. ``raster``: how georeferenced rasters feed the model
    (:mod:`segflow.raster`).
    """
    started = time.perf_counter()
    model_options = model_options or {}
    # Unknown model, missing weights, a bad card, model file or ground truth: fail here,
    # before any work.
    checked = checked or check_segment_job(
        input,
        model,
        out,
        run_id=run_id,
        shard_size=shard_size,
        model_options=model_options,
        gt=gt,
        ignore_index=ignore_index,
        model_sha256=model_sha256,
        raster=raster,
    )
    # The actors load the file of the hash the run records.
    model_sha256 = checked.config["model_sha256"]
    try:
        connect(ray_address)
        plan = plan_run(input, checked.out, checked.run_id, checked.config, checked.evaluation)
        if on_plan is not None:
            on_plan(plan)
        # The actors' share of the arguments, picked as prestart_segment picks it.
        workers = worker_config(locals())
        run_now = run_shards(plan, workers, on_shard)
        return finish_run(plan, run_now, time.perf_counter() - started)
    finally:
        discard_prestart()


def prestart_segment(input: str, model: str, out: str, **options: Any) -> Workers:
    """Before calling :func:`segment` with the same arguments: connect to Ray and start the
    actors loading the model, which then overlaps Prefect's start-up, the flow's checks
    and the run's planning. The flow takes the actors over."""
    arguments = inspect.signature(segment.fn).bind(input, model, out, **options)
    arguments.apply_defaults()
    return prestart(arguments.arguments["ray_address"], worker_config(arguments.arguments))


def worker_config(arguments: Mapping[str, Any]) -> WorkerConfig:
    """The actors' part of the flow's arguments."""
    values = {field.name: arguments[field.name] for field in dataclasses.fields(WorkerConfig)}
    model = _absolute_if_exists(values["model"])
    model_options = values["model_options"] or {}
    return WorkerConfig(
        **values
        | {
            "model": model,
            "model_options": tuple(sorted(model_options.items())),
            "model_sha256": recorded_sha256(model, model_options, values["model_sha256"]),
        }
    )


def _absolute_if_exists(path: str) -> str:
    return os.path.abspath(path) if os.path.exists(path) else path
