"""Model cards: the JSON beside an exported model stating its classes and input contract.

Only what inference depends on is validated; informational fields (source, reference,
ground_truth, ...) are left to the reader. Every error names the card file and the field.
Values beyond any real model's (:data:`MAX_CLASSES`, :data:`MAX_SIDE`, :data:`MAX_BATCH`)
are refused here, before a graph is run with them; that the graph itself fits its card is
checked when it is loaded (:func:`segflow.models.exported.check_against_card`).

``input.min_size`` (optional, null or absent when the graph takes any size): the smallest
height and width the graph accepts; smaller images are padded up to it and the logits
cropped back. A ``.pt2`` states its own minimum too (its range constraints), and the larger
of the two applies.

``input.bands`` (optional): the 1-based bands of a georeferenced raster that feed the R, G
and B channels (:mod:`segflow.raster`); ``--bands`` overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.models.errors import ModelCardError
from segflow.prediction import Task

# How an instance model's graph output becomes instances (segflow.models.exported_instance).
INSTANCE_METHODS = ("boundary-band",)

# Far beyond real label sets (ADE20K-full: 3688 classes) and inputs, and below what would
# exhaust memory at once: logits of 10,000 classes over a 1024 px tile are 40 GiB in fp32.
MAX_CLASSES = 10_000
MAX_SIDE = 8192  # fixed_size, size_multiple and min_size, in pixels
MAX_BATCH = 256  # images per call of a static-batch graph


@dataclass(frozen=True)
class InstanceSpec:
    """A card's ``instances`` section: how per-pixel outputs become instances."""

    method: str
    things: tuple[int, ...]  # class ids cut into instances
    band: int  # boundary band width in pixels, as trained
    min_area: int  # smaller pieces are dropped as noise


@dataclass(frozen=True)
class ModelCard:
    path: Path
    name: str
    task: Task
    classes: tuple[str, ...]
    fixed_size: tuple[int, int] | None  # (height, width) the graph only accepts
    size_multiple: int | None  # height and width must be multiples of this
    batch: int | None  # None: any batch size; N: the graph only accepts batches of N
    instances: InstanceSpec | None = None  # instance models only
    min_size: int | None = None  # smallest height and width the graph accepts
    bands: tuple[int, ...] | None = None  # 1-based raster bands that feed the channels


def card_fields(
    *,
    name: str,
    task: Task,
    classes: list[str],
    fixed_size: tuple[int, int] | None = None,
    size_multiple: int | None = None,
) -> dict[str, Any]:
    """A card's required fields for a graph taking RGB floats in [0, 1] (NCHW, any batch) and
    returning logits at input resolution: what an exporter writes beside its ``.pt2``, adding
    its own informational fields (source, reference, ...) and, for instance models, the
    ``instances`` section."""
    return {
        "name": name,
        "task": task,
        "classes": list(classes),
        "input": {
            "color": "RGB",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "fixed_size": list(fixed_size) if fixed_size else None,
            "size_multiple": size_multiple,
            "batch": "dynamic",
        },
        "output": {"kind": "logits", "layout": "NCHW", "resolution": "same as input"},
    }


def card_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def read_card(model_path: Path) -> ModelCard:
    """Read and validate the card of ``model_path`` (same stem, ``.json``)."""
    path = card_path(model_path)
    if not path.is_file():
        raise ModelCardError(
            f"model card {path} not found: an exported model needs its card beside it "
            f"(same stem, .json) stating task, classes and input contract"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelCardError(f"model card {path} is not readable JSON: {error}") from error
    return _parse(raw, path, default_name=model_path.stem)


def _parse(raw: Any, path: Path, default_name: str) -> ModelCard:
    fields = _Fields(path)
    if not isinstance(raw, dict):
        raise ModelCardError(f"model card {path} must hold a JSON object")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise fields.error("name", f"must be a non-empty string, got {name!r}")
    task = raw.get("task", "<missing>")
    if task not in ("semantic", "instance"):
        raise fields.error("task", f"must be 'semantic' or 'instance', got {task!r}")
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes or not all(_is_name(c) for c in classes):
        raise fields.error("classes", f"must be a non-empty list of class names, got {classes!r}")
    if len(classes) > MAX_CLASSES:
        raise fields.error("classes", f"lists {len(classes)} classes, more than {MAX_CLASSES}")

    contract = fields.section(raw, "input")
    fields.expect(contract, "input.color", "RGB")
    fields.expect(contract, "input.dtype", "float32")
    fields.expect(contract, "input.layout", "NCHW")
    fields.expect(contract, "input.range", [0.0, 1.0])
    fixed_size = fields.nullable(
        contract, "input.fixed_size", _is_size, f"[height, width], each 1 to {MAX_SIDE}"
    )
    size_multiple = fields.nullable(
        contract, "input.size_multiple", _is_side, f"an integer from 1 to {MAX_SIDE}"
    )
    min_size = contract.get("min_size")
    if min_size is not None and not _is_side(min_size):
        raise fields.error(
            "input.min_size", f"must be null or an integer from 1 to {MAX_SIDE}, got {min_size!r}"
        )
    if fixed_size and size_multiple and any(side % size_multiple for side in fixed_size):
        raise fields.error("input.fixed_size", f"{fixed_size} is not a multiple of size_multiple")
    batch = contract.get("batch")
    if batch != "dynamic" and not (_is_count(batch) and batch <= MAX_BATCH):
        raise fields.error(
            "input.batch", f"must be 'dynamic' or an integer from 1 to {MAX_BATCH}, got {batch!r}"
        )

    bands = contract.get("bands")
    if bands is not None and not (
        isinstance(bands, list) and len(bands) == 3 and all(_is_count(band) for band in bands)
    ):
        raise fields.error(
            "input.bands",
            f"must be null or 3 band numbers from 1 (one per RGB channel), got {bands!r}",
        )

    output = fields.section(raw, "output")
    fields.expect(output, "output.kind", "logits")
    fields.expect(output, "output.layout", "NCHW")
    return ModelCard(
        path=path,
        name=name,
        task=task,
        classes=tuple(classes),
        fixed_size=tuple(fixed_size) if fixed_size else None,
        size_multiple=size_multiple,
        batch=None if batch == "dynamic" else batch,
        instances=_instances(fields, raw, classes) if task == "instance" else None,
        min_size=min_size,
        bands=tuple(bands) if bands else None,
    )


def _instances(fields: _Fields, raw: dict[str, Any], classes: list[str]) -> InstanceSpec:
    if "instances" not in raw:
        raise fields.error(
            "instances",
            "is missing: a card whose 'task' is 'instance' states there how instances are "
            f"formed (method, one of {INSTANCE_METHODS}; things, band, min_area)",
        )
    section = fields.section(raw, "instances")
    method = section.get("method")
    if method not in INSTANCE_METHODS:
        raise fields.error("instances.method", f"must be one of {INSTANCE_METHODS}, got {method!r}")
    things = section.get("things")
    if not isinstance(things, list) or not things or not set(things) <= set(classes):
        raise fields.error(
            "instances.things", f"must be a non-empty list of the card's classes, got {things!r}"
        )
    band, min_area = section.get("band"), section.get("min_area")
    if not _is_count(band):
        raise fields.error("instances.band", f"must be an integer >= 1, got {band!r}")
    if not _is_count(min_area):
        raise fields.error("instances.min_area", f"must be an integer >= 1, got {min_area!r}")
    return InstanceSpec(
        method=method,
        things=tuple(classes.index(thing) for thing in things),
        band=band,
        min_area=min_area,
    )


class _Fields:
    """Checks on dotted card fields (``"input.fixed_size"``), raising errors that name them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, field: str, problem: str) -> ModelCardError:
        return ModelCardError(f"model card {self.path}: field {field!r} {problem}")

    def section(self, raw: dict[str, Any], field: str) -> dict[str, Any]:
        value = raw.get(field)
        if not isinstance(value, dict):
            raise self.error(field, f"must be an object, got {value!r}")
        return value

    def expect(self, container: dict[str, Any], field: str, expected: object) -> None:
        value = container.get(_key(field), "<missing>")
        if value != expected:
            raise self.error(field, f"must be {expected!r}, got {value!r}")

    def nullable(self, container: dict[str, Any], field: str, is_valid, description: str):
        """A field that must be present, holding null or a valid value."""
        if _key(field) not in container:
            raise self.error(field, "is missing (use null when it does not apply)")
        value = container[_key(field)]
        if value is not None and not is_valid(value):
            raise self.error(field, f"must be null or {description}, got {value!r}")
        return value


def _key(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_side(value: object) -> bool:
    return _is_count(value) and value <= MAX_SIDE


def _is_size(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_side(v) for v in value)
