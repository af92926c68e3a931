"""The checks of a segment job that need neither Ray nor Prefect, made before either starts.

A job that cannot run fails here, in the seconds a model load takes, with one error naming
the input and the problem (a :class:`~segflow.errors.SegflowError`), and nothing written:

- the model: resolved and loaded on the CPU, so an unknown name, a missing card or weights,
  or a corrupt file fails now rather than in every actor;
- the input: it exists (a folder, a file, a glob, an ``s3://`` prefix); listing it is left to
  the run's planning, which a corpus of millions makes long;
- the ground truth: it opens and fits the model; an ``ignore_index`` must be a label the
  ground truth can hold or a class of the model (300 in 8-bit label files is a typo, not a
  label);
- the output: not a file, its bucket exists, and a run already there has the same
  configuration (a resume) or the job stops.

What passes becomes a :class:`CheckedJob`: the run's id and configuration (what ``run.json``
records), and what its evaluation needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segflow.errors import SegflowError
from segflow.groundtruth import GroundTruthError, open_ground_truth
from segflow.manifest import check_input
from segflow.models import load_model
from segflow.scoring import ImageScorer
from segflow.store import RunStore


class ModelLoadError(SegflowError, ValueError):
    """A model that resolves but cannot be loaded (a corrupt or foreign file)."""


@dataclass(frozen=True)
class CheckedJob:
    """A segment job that passed :func:`check_segment_job`."""

    out: str  # absolute where it is a local path: actors on other nodes resolve it alike
    run_id: str
    config: Mapping[str, Any]  # what run.json records; a resume must match it exactly
    evaluation: Mapping[str, Any] | None  # what evaluating the run needs (runs with --gt)

    @property
    def model(self) -> str:
        return self.config["model"]


def check_segment_job(
    input: str,
    model: str,
    out: str,
    *,
    run_id: str | None,
    shard_size: int,
    model_options: Mapping[str, Any],
    gt: str | None,
    ignore_index: int | None,
) -> CheckedJob:
    """Check the job (see the module docstring); raises a SegflowError naming what is wrong."""
    if "://" not in out:
        out = os.path.abspath(out)
    model = os.path.abspath(model) if os.path.exists(model) else model
    loaded = _load(model, model_options)
    evaluation = evaluation_info(loaded, gt, ignore_index)
    check_input(input)
    config = run_config(input, model, shard_size, dict(model_options), gt, ignore_index)
    run_id = run_id or default_run_id(config)
    RunStore(out, run_id).check(config)
    return CheckedJob(out=out, run_id=run_id, config=config, evaluation=evaluation)


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


def default_run_id(config: Mapping[str, Any]) -> str:
    """The same command gets the same run id, so rerunning it resumes the run."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def evaluation_info(model: Any, gt: str | None, ignore_index: int | None) -> dict[str, Any] | None:
    """What the evaluation of the run needs besides its tables, checked now: a ground truth
    that cannot be opened or does not fit the model fails the job before any work."""
    if gt is None:
        if ignore_index is not None:
            raise GroundTruthError("--ignore-index applies to ground truth: give --gt too")
        return None
    ground_truth = open_ground_truth(gt, ignore_index=ignore_index)
    ImageScorer(ground_truth, model.classes, model.task)
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
    }


def _load(model: str, options: Mapping[str, Any]) -> Any:
    try:
        return load_model(model, device="cpu", **options)
    except SegflowError:
        raise
    except Exception as exc:
        # torch and onnxruntime raise what their parsers meet (RuntimeError, zip errors,
        # protobuf errors); the user needs the file and the first line of the reason.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {model!r} cannot be loaded: {reason}") from exc
