"""Models of the user's own: a factory named ``module.path:callable``, or registered by a
package under the entry-point group ``segflow.models``.

The factory is imported where the model is loaded (the driver, then every actor, so the
module must be importable there: installed, or on ``PYTHONPATH``), and called as
``factory(device=<torch.device>, **model_options)`` (``--model-option KEY=VALUE``). It
returns a model that honours segflow's model protocol (:class:`ModelProtocol`):

- ``name``: str, and ``task``: ``"semantic"`` or ``"instance"``;
- ``classes``: the class names in id order (a non-empty sequence of str);
- ``predict(images) -> list[SemanticPrediction | InstancePrediction]``: one prediction per
  RGB uint8 ``(H, W, 3)`` image, in input order, at each image's size
  (:mod:`segflow.prediction`). segflow calls it with up to ``--batch-size`` images.

A package registers names in its metadata, e.g. in ``pyproject.toml``::

    [project.entry-points."segflow.models"]
    roads = "roadseg.models:make_roads_model"

``segflow segment --model roads`` then loads it, and ``segflow models`` lists it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from segflow.errors import SegflowError
from segflow.prediction import Prediction, Task

ENTRY_POINT_GROUP = "segflow.models"
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class UserModelError(SegflowError, ValueError):
    """A user model that cannot be imported, or that does not honour the model protocol."""


@runtime_checkable
class ModelProtocol(Protocol):
    """What segflow needs of a model (see the module docstring)."""

    name: str
    task: Task
    classes: Sequence[str]

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[Prediction]: ...


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` names a factory as ``module.path:callable``."""
    return _FACTORY.fullmatch(spec) is not None


def registered_entry_points() -> dict[str, EntryPoint]:
    """The models packages register under :data:`ENTRY_POINT_GROUP`, by name."""
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def load_user_model(spec: str, *, device: torch.device, **options: Any) -> ModelProtocol:
    """The model ``spec``'s factory returns for ``device`` and ``options``; an error naming
    ``spec`` when it cannot be imported or called, or when what it returns is not a model."""
    factory = _factory(spec)
    model = factory(device=device, **options)
    missing = [
        attribute
        for attribute in ("name", "task", "classes", "predict")
        if not hasattr(model, attribute)
    ]
    if missing:
        raise UserModelError(
            f"model {spec!r} returned a {type(model).__name__} without {', '.join(missing)}: "
            "a model has name, task, classes and predict(images) (segflow.models.user)"
        )
    if model.task not in ("semantic", "instance"):
        raise UserModelError(
            f"model {spec!r}: task must be 'semantic' or 'instance', got {model.task!r}"
        )
    classes = model.classes
    if isinstance(classes, str) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserModelError(
            f"model {spec!r}: classes must be a non-empty sequence of names, got {classes!r}"
        )
    if not callable(model.predict):
        raise UserModelError(f"model {spec!r}: predict is not callable")
    return model


def _factory(spec: str) -> Callable[..., Any]:
    point = registered_entry_points().get(spec)
    target = point.value if point is not None else spec
    named = f"model {spec!r}" + (f" (entry point {target!r})" if point is not None else "")
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserModelError(
            f"{named}: no module named {exc.name!r} (the module must be importable: "
            "installed, or on PYTHONPATH)"
        ) from exc
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UserModelError(f"{named}: module {module_name!r} has no {attribute!r}") from None
    if not callable(found):
        raise UserModelError(f"{named}: {attribute!r} is a {type(found).__name__}, not callable")
    return found
