"""The ``segment`` flow: list a corpus, shard it, run the shards on Ray actors, summarise.

Prefect sees three tasks per run (plan, run the shards, finish), never one per image: its
server slows down with thousands of task runs, and Ray already schedules, retries and
restarts at shard level. Rerunning the same command resumes: committed shards are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from ray.util import ActorPool

import segflow
from segflow.decode import DEFAULT_MAX_PIXELS
from segflow.groundtruth import open_ground_truth
from segflow.manifest import Shard, build_manifest, shards
from segflow.models import load_model
from segflow.scoring import ImageScorer
from segflow.store import RunStore
from workers.cluster import connect, plan_actors
from workers.segment_actor import SegmentActor

DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class Plan:
    store: RunStore
    manifest: pa.Array
    pending: list[Shard]
    total_shards: int
    resumed: bool


def run_config(
    input: str,
    model: str,
    shard_size: int,
    model_options: dict[str, Any],
    gt: str | None,
    ignore_index: int | None,
) -> dict:
    """What a run's output depends on; a resume must match it exactly. The ground truth is
    recorded for the evaluation step that reads it."""
    return {
        "input": input,
        "model": model,
        "model_options": model_options,
        "shard_size": shard_size,
        "gt": gt,
        "ignore_index": ignore_index,
    }


def default_run_id(config: dict[str, Any]) -> str:
    """The same command gets the same run id, so rerunning it resumes the run."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def _transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (a flaky store), not a bad input or a conflicting
    run, which would only fail again later."""
    try:
        state.result()
    except (ValueError, ImportError):
        return False
    except Exception:
        return True
    return False


def evaluation_info(model: Any, gt: str | None, ignore_index: int | None) -> dict[str, Any] | None:
    """What the evaluation of the run needs besides its tables, checked now: a ground truth
    that cannot be opened or does not fit the model fails the job before any work."""
    if gt is None:
        return None
    ground_truth = open_ground_truth(gt, ignore_index=ignore_index)
    ImageScorer(ground_truth, model.classes, model.task)
    return {
        "task": model.task,
        "classes": list(model.classes),
        "gt": gt,
        "ignore_index": ignore_index,
        "categories": {str(k): v for k, v in (ground_truth.categories or {}).items()},
    }


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
    manifest = store.read_manifest() if resumed else None
    if manifest is None:
        manifest = build_manifest(input)  # a bad input fails here, before anything is written
        store.prepare(config)
        store.write_manifest(manifest)
    if evaluation is not None:
        store.write_json("evaluation.json", evaluation)
    all_shards = list(shards(len(manifest), config["shard_size"]))
    done = store.committed()
    pending = [s for s in all_shards if s.index not in done]
    logger.info(
        "run %s: %d images in %d shards, %d already committed",
        run_id,
        len(manifest),
        len(all_shards),
        len(all_shards) - len(pending),
    )
    return Plan(store, manifest, pending, len(all_shards), resumed)


# A retry re-reads the commits, so it runs only the shards the failed attempt left undone.
@task(cache_policy=NONE, retries=2, retry_delay_seconds=10)
def run_shards(
    plan: Plan,
    *,
    model: str,
    out: str,
    device: str,
    model_options: dict[str, Any],
    batch_size: int,
    prefetch_threads: int,
    max_pixels: int | None,
    cpus_per_actor: float | None,
    gt: str | None,
    ignore_index: int | None,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    done = plan.store.committed()
    pending = [shard for shard in plan.pending if shard.index not in done]
    if not pending:
        return []
    actors = plan_actors(len(pending), device=device, cpus_per_actor=cpus_per_actor)
    get_run_logger().info(
        "%d actor(s), %s CPU and %s GPU each", actors.actors, actors.num_cpus, actors.num_gpus
    )
    remote_actor = ray.remote(SegmentActor).options(
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        # Ray's fault tolerance: a dead actor is restarted and its shard retried on it.
        max_restarts=-1,
        max_task_retries=-1,
    )
    manifest_ref = ray.put(plan.manifest)
    workers = [
        remote_actor.remote(
            manifest_ref,
            model=model,
            out=out,
            run_id=plan.store.run_id,
            device=actors.device,
            model_options=model_options,
            batch_size=batch_size,
            prefetch_threads=prefetch_threads,
            max_pixels=max_pixels,
            gt=gt,
            ignore_index=ignore_index,
        )
        for _ in range(actors.actors)
    ]
    summaries = []
    try:
        pool = ActorPool(workers)
        for summary in pool.map_unordered(
            lambda actor, shard: actor.__call__.remote(shard), pending
        ):
            summaries.append(summary)
            if on_shard is not None:
                on_shard(summary)
    finally:
        # Free the GPUs and memory now: a driver on a long-lived cluster may go on to other work.
        for worker in workers:
            ray.kill(worker)
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
        raise RuntimeError(f"run {plan.store.run_id}: only {committed} shards are committed")
    plan.store.finish(summary)
    create_markdown_artifact(
        key=f"segment-run-{plan.store.run_id}".lower().replace("_", "-"),
        markdown="\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary.items())]),
        description=f"segflow segment run {plan.store.run_id}",
    )
    return summary


def _absolute_if_local(location: str) -> str:
    return (
        os.path.abspath(location)
        if "://" not in location and os.path.exists(location)
        else location
    )


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
    prefetch_threads: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cpus_per_actor: float | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input`` with ``model`` into ``out``; returns the run summary.

    ``on_plan`` and ``on_shard`` let a caller (the CLI's progress bar) follow the run.
    """
    started = time.perf_counter()
    model_options = model_options or {}
    # Actors on other nodes, or in another working directory, must find the same files.
    if "://" not in out:
        out = os.path.abspath(out)
    if os.path.exists(model):
        model = os.path.abspath(model)
    # Unknown model, missing weights, a bad card or ground truth: fail here, before any work.
    evaluation = evaluation_info(load_model(model, device="cpu", **model_options), gt, ignore_index)
    config = run_config(input, model, shard_size, model_options, gt, ignore_index)
    run_id = run_id or default_run_id(config)
    connect(ray_address)
    plan = plan_run(input, out, run_id, config, evaluation)
    if on_plan is not None:
        on_plan(plan)
    run_now = run_shards(
        plan,
        model=model,
        out=out,
        device=device,
        model_options=model_options,
        batch_size=batch_size,
        prefetch_threads=prefetch_threads,
        max_pixels=max_pixels,
        cpus_per_actor=cpus_per_actor,
        gt=gt,
        ignore_index=ignore_index,
        on_shard=on_shard,
    )
    return finish_run(plan, run_now, time.perf_counter() - started)
