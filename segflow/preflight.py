"""The checks of a segment job that need neither Ray nor Prefect, made before either starts.

A job that cannot run fails here, in the seconds a model load takes, with one error naming
the input and the problem (a :class:`~segflow.errors.SegflowError`), and nothing written:

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
from segflow.models import load_model, model_file
from segflow.models.integrity import checked_sha256
from segflow.raster import RasterOptions, require_rasterio
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
    model_sha256: str | None = None,
    raster: RasterOptions | None = None,
) -> CheckedJob:
    """Check the job (see the module docstring); raises a SegflowError naming what is wrong.
    ``model_sha256`` pins the model file (``--model-sha256``); ``raster``: how georeferenced
    rasters feed the model (recorded only when given, so other runs keep their ids)."""
    if "://" not in out:
        out = os.path.abspath(out)
    model = os.path.abspath(model) if os.path.exists(model) else model
    model_sha256 = recorded_sha256(model, model_options, model_sha256)
    loaded = _load(model, model_options, model_sha256)
    evaluation = evaluation_info(loaded, gt, ignore_index)
    check_input(input)
    config = run_config(
        input, model, shard_size, dict(model_options), gt, ignore_index, model_sha256
    )
    if raster is not None:
        require_rasterio("--bands and --rescale (GeoTIFF inputs)")
        config["raster"] = raster.as_config()
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
    model_sha256: str | None,
) -> dict:
    """What a run's output depends on; a resume must match it exactly. The ground truth is
    recorded for the evaluation step that reads it; the model file's sha256 (None: the
    model reads no file), which every actor checks the file it loads against."""
    return {
        "input": input,
        "model": model,
        "model_sha256": model_sha256,
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


def recorded_sha256(model: str, model_options: Mapping[str, Any], pinned: str | None) -> str | None:
    """The hash the run's model file must have: ``pinned`` (``--model-sha256``), else that
    of the file ``model`` is built from as it is now (None: it reads none)."""
    if pinned is not None:
        return checked_sha256(pinned)
    found = model_file(model, model_options.get("weights"))
    return None if found is None else found.sha256


def _load(model: str, options: Mapping[str, Any], sha256: str | None) -> Any:
    try:
        return load_model(model, device="cpu", sha256=sha256, **options)
    except SegflowError:
        raise
    except Exception as exc:
        # torch and onnxruntime raise what their parsers meet (RuntimeError, zip errors,
        # protobuf errors); the user needs the file and the first line of the reason.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {model!r} cannot be loaded: {reason}") from exc
