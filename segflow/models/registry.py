"""Model names -> loaders, imported lazily (the fsspec ``known_implementations`` pattern).

Nothing heavy is imported until a model is loaded: torchvision's detection models,
onnxruntime and segmentation_models_pytorch stay out of ``sys.modules`` until needed, and a
missing optional dependency is reported with the extra that installs it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segflow.models.base import SegmentationModel
from segflow.models.card import card_path, read_card
from segflow.models.errors import MissingDependencyError, ModelIntegrityError, UnknownModelError
from segflow.models.integrity import ModelFile
from segflow.models.runtime import resolve_device
from segflow.models.user import (
    ENTRY_POINT_GROUP,
    ModelProtocol,
    UserModelError,
    is_factory_spec,
    load_user_model,
    registered_entry_points,
)
from segflow.models.weights import wants_random_weights
from segflow.prediction import Task

if TYPE_CHECKING:
    from segflow.job import Job


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: ``loader`` is ``"module:callable"``, called with the name. A
    model a package registers (:mod:`segflow.models.user`) has no ``task`` until loaded."""

    name: str
    task: Task | None
    source: str
    loader: str
    requires: str | None = None  # optional package the loader needs
    extra: str | None = None  # the segflow extra that installs it
    # "module:callable" giving, for the name, the file of its default pretrained weights.
    default_weights: str | None = None


_TORCHVISION_SEMANTIC = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
_TORCHVISION_INSTANCE = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
_SMP_ARCHITECTURES = ("Unet", "DeepLabV3Plus", "PSPNet", "FPN")
_TORCHVISION_WEIGHTS = "segflow.models.torchvision_zoo:default_weights_path"

KNOWN_MODELS: dict[str, ModelInfo] = {
    **{
        name: ModelInfo(
            name,
            "semantic",
            "torchvision",
            "segflow.models.torchvision_zoo:load_semantic",
            default_weights=_TORCHVISION_WEIGHTS,
        )
        for name in _TORCHVISION_SEMANTIC
    },
    **{
        name: ModelInfo(
            name,
            "instance",
            "torchvision",
            "segflow.models.torchvision_zoo:load_instance",
            default_weights=_TORCHVISION_WEIGHTS,
        )
        for name in _TORCHVISION_INSTANCE
    },
    **{
        f"smp:{arch}": ModelInfo(
            f"smp:{arch}",
            "semantic",
            "segmentation_models_pytorch",
            "segflow.models.smp_zoo:load",
            requires="segmentation_models_pytorch",
            extra="smp",
        )
        for arch in _SMP_ARCHITECTURES
    },
}

EXPORTED_FORMATS: dict[str, ModelInfo] = {
    ".pt2": ModelInfo("*.pt2", "semantic", "torch.export", "segflow.models.exported:load_pt2"),
    ".onnx": ModelInfo(
        "*.onnx",
        "semantic",
        "onnx",
        "segflow.models.exported:load_onnx",
        requires="onnxruntime",
        extra="onnx",
    ),
}

# Exported models whose card states "task": "instance" (see segflow.models.exported_instance).
EXPORTED_INSTANCE_FORMATS: dict[str, ModelInfo] = {
    ".pt2": ModelInfo(
        "*.pt2", "instance", "torch.export", "segflow.models.exported_instance:load_pt2"
    ),
}


def available_models() -> list[ModelInfo]:
    """Registered names, segflow's and those packages register under the entry-point group
    ``segflow.models`` (exported ``.pt2`` / ``.onnx`` files are loaded by path instead)."""
    registered = [
        ModelInfo(
            name, None, f"entry point ({point.dist.name if point.dist else '?'})", point.value
        )
        for name, point in sorted(registered_entry_points().items())
        if name not in KNOWN_MODELS
    ]
    return list(KNOWN_MODELS.values()) + registered


def is_user_model(spec: str | Path) -> bool:
    """Whether ``spec`` is a model of the user's own: a ``module:callable`` factory or a
    name a package registers (:mod:`segflow.models.user`)."""
    if not isinstance(spec, str) or spec in KNOWN_MODELS:
        return False
    return spec in registered_entry_points() or (
        is_factory_spec(spec) and not spec.startswith("smp:")
    )


def model_task(spec: str | Path) -> Task:
    """The task of a registered or exported model, known without loading it."""
    info, _ = _resolve(spec)
    assert info.task is not None
    return info.task


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "auto",
    weights: str | Path | None = None,
    sha256: str | None = None,
    **options,
) -> SegmentationModel | ModelProtocol:
    """Load a registered model by name, or an exported ``.pt2`` / ``.onnx`` by path (its model
    card, same stem ``.json``, must sit beside it). ``weights``: a local weights file, or
    ``"none"`` for random initialisation; registered models default to their pretrained
    weights from the torch hub cache where they have any. ``sha256``: the expected hash of
    the model file (:func:`model_file`), checked on the bytes the model is built from.
    ``options`` go to the loader (``batch_size``, ``precision``; semantic: ``return_scores``,
    ``tile_size``, ``tile_overlap``; instance: thresholds). A user model's factory
    (:func:`is_user_model`) gets ``device`` and ``options``, and reads no file segflow checks."""
    if is_user_model(spec):
        if weights is not None or sha256 is not None:
            raise UserModelError(
                f"model {spec!r} is the user's own: segflow checks no weights file or sha256 "
                "for it (pass its options with --model-option)"
            )
        return load_user_model(str(spec), device=resolve_device(device), **options)
    info, argument = _resolve(spec)
    if sha256 is not None and wants_random_weights(weights):
        raise ModelIntegrityError(
            f"model {spec} with random weights reads no file, so sha256 {sha256} cannot be checked"
        )
    loader = _import_loader(info)
    return loader(argument, device=device, weights=weights, sha256=sha256, **options)


def load_job_model(job: Job, *, device: str | torch.device) -> SegmentationModel | ModelProtocol:
    """``job``'s model on ``device``, with the job's options: a registered or exported
    model's loader gets those of its task (:meth:`Job.loader_options`) and the recorded
    sha256; a user model's factory its ``model_options``."""
    if is_user_model(job.model):
        return load_model(job.model, device=device, **dict(job.model_options))
    options = job.loader_options(model_task(job.model))
    return load_model(job.model, device=device, sha256=job.model_sha256, **options)


def model_file(spec: str | Path, weights: str | Path | None = None) -> ModelFile | None:
    """The file :func:`load_model` builds ``spec`` from, with its hash: an exported model's
    file, or a registered model's weights file (``weights``, else its default pretrained
    weights). None when there is no such file (random weights, or a file that is missing,
    which loading then reports, and user models)."""
    if is_user_model(spec):
        return None
    info, argument = _resolve(spec)
    if isinstance(argument, Path):  # an exported model
        path = argument
    elif wants_random_weights(weights):
        return None
    elif weights is not None:
        path = Path(weights)
    elif info.default_weights is not None:
        path = _import(info.default_weights)(info.name)
    else:
        return None
    return ModelFile.of(path) if path.is_file() else None


def _resolve(spec: str | Path) -> tuple[ModelInfo, str | Path]:
    if isinstance(spec, str) and spec in KNOWN_MODELS:
        return KNOWN_MODELS[spec], spec
    path = Path(spec)
    exported = EXPORTED_FORMATS.get(path.suffix.lower())
    if exported is not None:
        if not path.is_file():
            raise FileNotFoundError(f"exported model {path} does not exist")
        # Without a card the loader reports it (after any missing dependency, named first).
        if card_path(path).is_file() and read_card(path).task == "instance":
            instance = EXPORTED_INSTANCE_FORMATS.get(path.suffix.lower())
            if instance is None:
                raise UnknownModelError(
                    f"{path}: its card {card_path(path)} states an instance model, and exported "
                    f"instance models load from {' / '.join(EXPORTED_INSTANCE_FORMATS)} files only"
                )
            return instance, path
        return exported, path
    close = difflib.get_close_matches(str(spec), list(KNOWN_MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {str(spec)!r}: not a registered name, not a path to a "
        f"{' / '.join(EXPORTED_FORMATS)} file and not a module:callable factory.{hint} "
        f"Registered: {', '.join(KNOWN_MODELS)}; packages register more under the "
        f"entry-point group {ENTRY_POINT_GROUP}"
    )


def _import_loader(info: ModelInfo):
    if info.requires is not None:
        try:
            importlib.import_module(info.requires)
        except ImportError as error:
            raise MissingDependencyError(
                f"model {info.name} needs {info.requires}, which is not installed: "
                f"pip install 'segflow[{info.extra}]'"
            ) from error
    return _import(info.loader)


def _import(target: str):
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)
