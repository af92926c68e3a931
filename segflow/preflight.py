"""The checks of a segment job (:class:`~segflow.job.Job`) that need neither Ray nor Prefect,
made once, before either starts: by the command line, or by the flow when it is given a job
unchecked (a deployment's run, Python).

A job that cannot run fails here, in the seconds a model load takes, with one error naming
the input and the problem (a :class:`~segflow.errors.SegflowError`), and nothing written:

- the job's options: each one set applies to the model's task (``--tile-size`` with an
  instance model is an error naming it), known from its name or card before it loads;
- the model: resolved, its file hashed (the sha256 the run records and every actor checks;
  ``--model-sha256`` pins it), and loaded on the CPU from those bytes, so an unknown name, a
  missing card or weights, a corrupt or unsafe file, or a card that does not fit its graph
  fails now rather than in every actor;
- the input: it exists (a folder, a file, a glob, an ``s3://`` prefix); listing it is left to
  the run's planning, which a corpus of millions makes long;
- the ground truth: it opens and fits the model; an ``ignore_index`` must be a label the
  ground truth can hold or a class of the model (300 in 8-bit label files is a typo, not a
  label);
- the output: not a file, its bucket exists, and a run already there has the same
  configuration (a resume) or the job stops.

What passes becomes a :class:`CheckedJob`: the job resolved (:func:`resolve_job`: its run id,
model file hash and absolute paths filled in), the run's configuration (what ``run.json``
records), and what its evaluation needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segflow.errors import SegflowError
from segflow.groundtruth import GroundTruthError, ModelClasses, open_ground_truth
from segflow.job import Job
from segflow.manifest import check_input
from segflow.metrics.boundary import TRIMAP_WIDTH
from segflow.models import model_file
from segflow.models.integrity import checked_sha256
from segflow.models.registry import is_user_model, load_job_model, model_task
from segflow.raster import require_rasterio
from segflow.scoring import scorer_for
from segflow.store import RunStore


class ModelLoadError(SegflowError, ValueError):
    """A model that resolves but cannot be loaded (a corrupt or foreign file)."""


@dataclass(frozen=True)
class CheckedJob:
    """A segment job that passed :func:`check_job`."""

    job: Job  # resolved (resolve_job)
    config: Mapping[str, Any]  # what run.json records; a resume must match it exactly
    evaluation: Mapping[str, Any] | None  # what evaluating the run needs (runs with --gt)

    @property
    def out(self) -> str:
        return self.job.out

    @property
    def run_id(self) -> str:
        assert self.job.run_id is not None
        return self.job.run_id


def check_job(job: Job) -> CheckedJob:
    """Check the job (see the module docstring); raises a SegflowError naming what is wrong."""
    job = resolve_job(job)
    if job.raster_options() is not None:
        require_rasterio("--bands and --rescale (GeoTIFF inputs)")
    user_model = is_user_model(job.model)
    # Before the model loads: an option of another task is the user's error, not the model's.
    job.check_task(None if user_model else model_task(job.model), user_model=user_model)
    loaded = _load(job)
    if user_model:  # its task is known now
        job.check_task(loaded.task)
    evaluation = evaluation_info(loaded, job.gt, job.ignore_index, job.trimap_width)
    check_input(job.input)
    config = run_config(job)
    RunStore(job.out, job.run_id).check(config)
    return CheckedJob(job=job, config=config, evaluation=evaluation)


def resolve_job(job: Job) -> Job:
    """``job`` as its run records it, the same wherever it is resolved (the prestarted actors
    are those of the run only when their jobs are equal): local paths absolute, as actors on
    other nodes read them; the model file's sha256 taken now unless pinned; the run id
    derived from the configuration unless given."""
    out = job.out if "://" in job.out else os.path.abspath(job.out)
    model = os.path.abspath(job.model) if os.path.exists(job.model) else job.model
    sha256 = recorded_sha256(model, dict(job.model_options), job.model_sha256)
    resolved = dataclasses.replace(job, out=out, model=model, model_sha256=sha256)
    return dataclasses.replace(resolved, run_id=job.run_id or default_run_id(run_config(resolved)))


def run_config(job: Job) -> dict:
    """What a run's output depends on; a resume must match it exactly. The ground truth is
    recorded for the evaluation step that reads it; the model file's sha256 (None: the
    model reads no file), which every actor checks the file it loads against; with ground
    truth, Trimap IoU's band width (its counts are part of the output); GPU decoding, whose
    pixels differ from the CPU's."""
    evaluated = {} if job.gt is None else {"trimap_width": job.trimap_width}
    raster, slicing = job.raster_options(), job.slicing()
    return {
        "input": job.input,
        "model": job.model,
        "model_sha256": job.model_sha256,
        "model_options": job.output_options(),
        "shard_size": job.shard_size,
        "gt": job.gt,
        "ignore_index": job.ignore_index,
        **evaluated,
        # Only when given, so that other runs keep their ids.
        **({} if raster is None else {"raster": raster.as_config()}),
        **({} if slicing is None else {"slicing": slicing.as_config()}),
        **({} if job.decode == "cpu" else {"decode": job.decode}),
    }


def default_run_id(config: Mapping[str, Any]) -> str:
    """The same command gets the same run id, so rerunning it resumes the run."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def evaluation_info(
    model: Any, gt: str | None, ignore_index: int | None, trimap_width: int = TRIMAP_WIDTH
) -> dict[str, Any] | None:
    """What the evaluation of the run needs besides its tables, checked now: a ground truth
    that cannot be opened or does not fit the model fails the job before any work."""
    if gt is None:
        if ignore_index is not None:
            raise GroundTruthError("--ignore-index applies to ground truth: give --gt too")
        return None
    ground_truth = open_ground_truth(gt, ignore_index=ignore_index, model=ModelClasses.of(model))
    scorer_for(ground_truth, model.classes, model.task, trimap_width=trimap_width)
    if ignore_index is not None and not (
        0 <= ignore_index < len(model.classes) or ignore_index in ground_truth.label_values()
    ):
        raise GroundTruthError(
            f"--ignore-index {ignore_index} is neither a class of the model (0-"
            f"{len(model.classes) - 1}) nor a label ground truth {gt!r} can hold"
        )
    return {
        "task": model.task,
        "classes": list(model.classes),
        "gt": gt,
        "ignore_index": ignore_index,
        "categories": {str(k): v for k, v in (ground_truth.categories or {}).items()},
        "trimap_width": trimap_width if model.task == "semantic" else None,
    }


def recorded_sha256(model: str, model_options: Mapping[str, Any], pinned: str | None) -> str | None:
    """The hash the run's model file must have: ``pinned`` (``--model-sha256``), else that
    of the file ``model`` is built from as it is now (None: it reads none)."""
    if pinned is not None:
        return checked_sha256(pinned)
    found = model_file(model, model_options.get("weights"))
    return None if found is None else found.sha256


def _load(job: Job) -> Any:
    # On the driver's CPU, where fp16 cannot run; the actors' device is known once Ray is.
    on_cpu = dataclasses.replace(job, precision="fp32") if job.precision == "fp16" else job
    try:
        return load_job_model(on_cpu, device="cpu")
    except SegflowError:
        raise
    except Exception as exc:
        # torch and onnxruntime raise what their parsers meet (RuntimeError, zip errors,
        # protobuf errors), a user's factory what it meets; the user needs the model and the
        # first line of the reason.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {job.model!r} cannot be loaded: {reason}") from exc
