"""A segment job: everything a run is made of, one frozen, validated value.

A :class:`Job` is built once, from the command line, from a Prefect deployment's parameters
(JSON: :meth:`Job.from_parameters`) or from Python (``Job(input=..., model=..., out=...)``),
and passed whole to the flow, the actors and the model loader. Its JSON form
(:meth:`Job.to_json` / :meth:`Job.from_json`) is its fields by name, the flow's parameters.

Building one checks each setting on its own (types, ranges, choices); a bad value is a
:class:`JobError` naming the command-line option. What needs the model (does an option apply
to its task?) is checked by :meth:`Job.check_task` once the model's task is known, before
any work (:mod:`segflow.preflight`).

Every field is declared once, below, with its metadata:

- ``flag``: the command-line option that sets it, which errors name;
- ``loader``: for a model option, the keyword the model loaders take it as; a field without
  one is not the model's;
- ``task``: the model task it applies to (``None``: any task). Set to anything but its
  default for a model of another task, it is an error;
- ``output``: whether it changes what a run writes (the run's recorded configuration, which
  a resume must match, holds those that do).

A new option is one field here, with its metadata; its checks go in ``__post_init__``. The
flow :func:`pipelines.segment.segment` takes the fields as parameters (a test holds the two
lists equal), and the command line gives it an option that it passes to :class:`Job`. A
model option (``loader=``) reaches the loaders of its task as that keyword; another reaches
whatever reads it off the job (the actor, the scorer).

Model options that only some loaders take (``smp:*``'s ``classes`` and ``weights``, a user
factory's own) are ``model_options``: ``--model-option KEY=VALUE``, the value read as JSON
where it parses (``classes=12``, ``classes=["road","sky"]``), else as text
(``weights=/models/unet.pt``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segflow.decode import DEFAULT_MAX_PIXELS
from segflow.errors import SegflowError
from segflow.metrics.boundary import TRIMAP_WIDTH
from segflow.shard import DEFAULT_READ_TIMEOUT

DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 8
DEFAULT_PREFETCH_THREADS = 4
# Seconds without an image done after which a shard is retried (workers.segment_actor).
DEFAULT_STALL_TIMEOUT = 600.0

# --actors-per-gpu where the actors get no GPU: refused rather than ignored, as a run laid out
# otherwise than asked (a deployment meant for GPUs that found none) should not go unnoticed.
CPU_ACTORS_PER_GPU = (
    "--actors-per-gpu {n} shares a GPU between actors, and {why}: CPU actors are already one "
    "process per --cpus-per-actor CPUs (default 1), so set that instead"
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DECODERS = ("cpu", "gpu")

if TYPE_CHECKING:
    from segflow.raster import RasterOptions
    from segflow.slicing import Slicing

JSONValue = str | int | float | bool | None | list | dict


class JobError(SegflowError, ValueError):
    """A job setting that is wrong on its own or for the job's model."""


def _setting(
    default: Any,
    *,
    flag: str | None = None,
    loader: str | None = None,
    task: str | None = None,
    output: bool = False,
) -> Any:
    return field(
        default=default,
        metadata={"flag": flag, "loader": loader, "task": task, "output": output},
    )


@dataclass(frozen=True)
class Job:
    """A segment job (see the module docstring). Only ``input``, ``model`` and ``out`` have
    no default."""

    input: str = field(metadata={"flag": "INPUT", "output": True})
    model: str = field(metadata={"flag": "--model", "output": True})
    out: str = field(metadata={"flag": "--out"})
    run_id: str | None = _setting(None, flag="--run-id")
    gt: str | None = _setting(None, flag="--gt", output=True)
    ignore_index: int | None = _setting(None, flag="--ignore-index", output=True)
    shard_size: int = _setting(DEFAULT_SHARD_SIZE, flag="--shard-size", output=True)
    model_sha256: str | None = _setting(None, flag="--model-sha256", output=True)
    # The model's options.
    batch_size: int = _setting(DEFAULT_BATCH_SIZE, flag="--batch-size", loader="batch_size")
    precision: str = _setting("auto", flag="--precision", loader="precision", output=True)
    tile_size: int | None = _setting(
        None, flag="--tile-size", loader="tile_size", task="semantic", output=True
    )
    tile_overlap: int | None = _setting(
        None, flag="--tile-overlap", loader="tile_overlap", task="semantic", output=True
    )
    soft_metrics: bool = _setting(
        False, flag="--soft-metrics", loader="return_probabilities", task="semantic", output=True
    )
    score_threshold: float | None = _setting(
        None, flag="--score-threshold", loader="score_threshold", task="instance", output=True
    )
    mask_threshold: float | None = _setting(
        None, flag="--mask-threshold", loader="mask_threshold", task="instance", output=True
    )
    max_detections: int | None = _setting(
        None, flag="--max-detections", loader="max_detections", task="instance", output=True
    )
    # How GeoTIFF inputs feed the model (segflow.raster): 1-based bands, and LOW,HIGH or
    # pLOW,pHIGH for data that is not 8-bit.
    bands: tuple[int, ...] | None = _setting(None, flag="--bands")
    rescale: str | None = _setting(None, flag="--rescale")
    # How instance models see GeoTIFF inputs (segflow.slicing): slices and their merging.
    slice_size: int | None = _setting(None, flag="--slice-size", task="instance")
    slice_overlap: int | None = _setting(None, flag="--slice-overlap", task="instance")
    slice_merge: str | None = _setting(None, flag="--slice-merge", task="instance")
    slice_match: float | None = _setting(None, flag="--slice-match", task="instance")
    # The scorer's, not the model's: Trimap IoU's band, pixels (runs with ground truth).
    trimap_width: int = _setting(TRIMAP_WIDTH, flag="--trimap-width", task="semantic")
    model_options: tuple[tuple[str, JSONValue], ...] = _setting(
        (), flag="--model-option", output=True
    )
    # Where and how it runs.
    ray_address: str | None = _setting(None, flag="--ray-address")
    device: str = _setting("auto", flag="--device")
    # gpu: JPEGs decoded by nvjpeg on the actor's GPU, whose pixels differ from the CPU
    # decoder's (segflow.decode), so the run's configuration records it when asked for.
    decode: str = _setting("cpu", flag="--decode")
    prefetch_threads: int = _setting(DEFAULT_PREFETCH_THREADS, flag="--prefetch-threads")
    cpus_per_actor: float | None = _setting(None, flag="--cpus-per-actor")
    # Actor processes sharing each GPU (workers.cluster.plan_actors): host work past the GIL.
    actors_per_gpu: int = _setting(1, flag="--actors-per-gpu")
    max_pixels: int | None = _setting(DEFAULT_MAX_PIXELS, flag="--max-pixels")
    read_timeout: float | None = _setting(DEFAULT_READ_TIMEOUT, flag="--read-timeout")
    stall_timeout: float | None = _setting(DEFAULT_STALL_TIMEOUT, flag="--stall-timeout")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Job)
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if setting.name == "model_options" and isinstance(value, Mapping | list | tuple):
                # An object (JSON's, a dict) or KEY, VALUE pairs: sorted, values hashable.
                value = _model_options(value)
                object.__setattr__(self, setting.name, value)
            if setting.name == "bands" and isinstance(value, list):  # a deployment's JSON
                value = tuple(value)
                object.__setattr__(self, setting.name, value)
            _check_type(setting, hints[setting.name], value)
        for name in ("shard_size", "batch_size", "prefetch_threads", "max_pixels", "tile_size"):
            self._check(name, lambda v: v is None or v >= 1, "must be at least 1")
        self._check("actors_per_gpu", lambda v: v >= 1, "must be at least 1")
        self._check("tile_overlap", lambda v: v is None or v >= 0, "must be at least 0")
        self._check("trimap_width", lambda v: v >= 0, "must be at least 0")
        self._check("max_detections", lambda v: v is None or v >= 1, "must be at least 1")
        for name in ("cpus_per_actor", "read_timeout", "stall_timeout"):
            self._check(name, lambda v: v is None or v > 0, "must be more than 0")
        self._check("score_threshold", lambda v: v is None or 0 <= v <= 1, "must be in [0, 1]")
        self._check("mask_threshold", lambda v: v is None or 0 <= v < 1, "must be in [0, 1)")
        self._check(
            "precision", lambda v: v in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"
        )
        self._check("device", lambda v: v in DEVICES, f"must be one of {', '.join(DEVICES)}")
        self._check("decode", lambda v: v in DECODERS, f"must be one of {', '.join(DECODERS)}")
        if self.device == "cpu" and self.decode == "gpu":
            raise JobError("--decode gpu needs a GPU (--device is cpu): leave --decode at cpu")
        if self.device == "cpu" and self.precision == "fp16":
            raise JobError(
                "--precision fp16 needs a GPU (--device is cpu): on the CPU use fp32 or bf16"
            )
        if self.device == "cpu" and self.actors_per_gpu > 1:
            raise JobError(CPU_ACTORS_PER_GPU.format(n=self.actors_per_gpu, why="--device is cpu"))
        self.raster_options()
        self.slicing()
        dedicated = {
            s.metadata["loader"]: s for s in dataclasses.fields(self) if s.metadata.get("loader")
        }
        for key, _ in self.model_options:
            if not key.isidentifier():
                raise JobError(f"--model-option {key!r}: the key must be a Python identifier")
            if key in dedicated:
                raise JobError(
                    f"--model-option {key}: set it with {dedicated[key].metadata['flag']}"
                )

    def raster_options(self) -> RasterOptions | None:
        """``bands`` and ``rescale`` as :mod:`segflow.raster`'s options; None when neither
        is set (checked: a wrong one raises a SegflowError naming the option)."""
        if self.bands is None and self.rescale is None:
            return None
        from segflow.raster import RasterOptions, Rescale, checked_bands

        return RasterOptions(
            bands=None if self.bands is None else checked_bands(self.bands, "--bands"),
            rescale=None if self.rescale is None else Rescale.parse(self.rescale),
        )

    def slicing(self) -> Slicing | None:
        """The ``slice_*`` settings as :mod:`segflow.slicing`'s, the unset ones at their
        defaults; None when none is set (checked: a wrong one raises a SegflowError naming
        the option)."""
        given = {
            name: getattr(self, f"slice_{name}")
            for name in ("size", "overlap", "merge", "match")
            if getattr(self, f"slice_{name}") is not None
        }
        if not given:
            return None
        from segflow.slicing import Slicing

        return Slicing(**given)

    def _check(self, name: str, holds: typing.Callable[[Any], bool], problem: str) -> None:
        value = getattr(self, name)
        if not holds(value):
            raise JobError(f"{_flag(name)} {problem}, got {value!r}")

    # -- the model's part --------------------------------------------------------------

    def check_task(self, task: str | None, *, user_model: bool = False) -> None:
        """Raise a :class:`JobError` naming the first option set that does not apply to a
        model of ``task`` (a user model takes only ``--batch-size`` and ``--model-option``,
        batching being segflow's and its options its own)."""
        for setting in dataclasses.fields(self):
            if not (setting.metadata.get("loader") or setting.metadata.get("task")):
                continue
            if getattr(self, setting.name) == setting.default:
                continue
            if user_model and setting.metadata["loader"] and setting.name != "batch_size":
                raise JobError(
                    f"{setting.metadata['flag']} does not apply to the user model "
                    f"{self.model!r}: give its own options with --model-option KEY=VALUE"
                )
            if task is not None and setting.metadata["task"] not in (None, task):
                article = "an" if task == "instance" else "a"
                raise JobError(
                    f"{setting.metadata['flag']} applies to {setting.metadata['task']} models "
                    f"only, and {self.model!r} is {article} {task} model"
                )

    def loader_options(self, task: str) -> dict[str, JSONValue]:
        """The keywords a registered or exported model's loader takes for this job: the
        options of ``task`` that are set, and ``model_options``."""
        options = {
            setting.metadata["loader"]: getattr(self, setting.name)
            for setting in self._model_settings()
            if setting.metadata["task"] in (None, task)
            and getattr(self, setting.name) not in (None, False)
        }
        return options | dict(self.model_options)

    def output_options(self) -> dict[str, JSONValue]:
        """The model options that change what the run writes, as its configuration records
        them: those set (not at their default), and ``model_options``."""
        return {
            setting.metadata["loader"]: getattr(self, setting.name)
            for setting in self._model_settings()
            if setting.metadata["output"] and getattr(self, setting.name) != setting.default
        } | dict(self.model_options)

    def _model_settings(self) -> list[dataclasses.Field]:
        return [s for s in dataclasses.fields(self) if s.metadata.get("loader")]

    # -- JSON ---------------------------------------------------------------------------

    def parameters(self) -> dict[str, JSONValue]:
        """The job as the flow's parameters (JSON types: ``model_options`` an object)."""
        values = {s.name: getattr(self, s.name) for s in dataclasses.fields(self)}
        return values | {"model_options": dict(self.model_options)}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> Job:
        """A job from parameters by field name (a deployment's, JSON's); an unknown name
        is an error naming it, a missing one takes its default."""
        names = {s.name for s in dataclasses.fields(cls)}
        unknown = sorted(set(parameters) - names)
        if unknown:
            raise JobError(
                f"unknown job parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        missing = [n for n in ("input", "model", "out") if parameters.get(n) is None]
        if missing:
            raise JobError(f"the job needs {', '.join(missing)}")
        given = {k: v for k, v in parameters.items() if not (k == "model_options" and v is None)}
        return cls(**given)

    def to_json(self) -> str:
        return json.dumps(self.parameters(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        try:
            parameters = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"a job's JSON does not parse: {exc}") from None
        if not isinstance(parameters, dict):
            raise JobError(f"a job's JSON must be an object, got {type(parameters).__name__}")
        return cls.from_parameters(parameters)


def model_option(text: str) -> tuple[str, JSONValue]:
    """``KEY=VALUE`` (``--model-option``): VALUE as JSON where it parses, else as text."""
    key, equals, raw = text.partition("=")
    if not equals or not key.strip():
        raise JobError(f"--model-option {text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _model_options(options: Mapping[str, Any] | list | tuple) -> tuple[tuple[str, JSONValue], ...]:
    pairs = list(options.items() if isinstance(options, Mapping) else options)
    if not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
        raise JobError(f"--model-option: model options are KEY, VALUE pairs, got {options!r}")
    keys = [str(key) for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise JobError(f"--model-option {', '.join(twice)} given more than once")
    return tuple(
        sorted(((k, _frozen(v)) for k, (_, v) in zip(keys, pairs, strict=True)), key=lambda p: p[0])
    )


def _frozen(value: Any) -> Any:
    """Lists as tuples, so that a job stays hashable (the actor pool is matched by it)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        raise JobError(f"--model-option values are numbers, text or lists, got {value!r}")
    return value


def _flag(name: str) -> str:
    return next(s.metadata["flag"] for s in dataclasses.fields(Job) if s.name == name)


def _check_type(setting: dataclasses.Field, hint: Any, value: Any) -> None:
    """JSON's types for a field of ``hint`` (``int | None``, ``float``, ...): an int is a
    float too; a bool is not an int."""
    allowed = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, type(int | None))
        else (hint,)
    )
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None and type(None) in allowed:
        return
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    else:
        ok = isinstance(value, tuple(a for a in allowed if isinstance(a, type)))
    if not ok:
        expected = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
        raise JobError(f"{setting.metadata['flag']} must be {expected}, got {value!r}")
