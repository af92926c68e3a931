"""Reading weights files safely and applying them strictly.

Weights files are untrusted input: they are read with ``weights_only=True`` (no arbitrary
unpickling) and never downloaded. Random initialisation is only ever an explicit choice.
A file is read once, and its bytes checked against an expected sha256 when there is one
(:mod:`segflow.models.integrity`).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from segflow.models.errors import MissingWeightsError
from segflow.models.integrity import read_verified

RANDOM_WEIGHTS = "none"
"""Pass ``weights="none"`` to build a model with randomly initialised weights."""

_CHECKPOINT_WRAPPER_KEYS = ("model", "state_dict")


def wants_random_weights(weights: str | Path | None) -> bool:
    return isinstance(weights, str) and weights == RANDOM_WEIGHTS


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file: plain, or the ``model`` / ``state_dict`` entry
    of a training checkpoint; with ``sha256``, the file's bytes must hash to it."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file {path} does not exist")
    data = read_verified(path, sha256)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"weights file {path} is not a weights-only PyTorch file: {error}"
        ) from error
    if isinstance(loaded, Mapping):
        for key in _CHECKPOINT_WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return dict(loaded)


def apply_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path):
    """Load ``state`` into ``module``, failing on any missing, unexpected or mis-shaped entry.

    Checked here rather than by ``strict=True`` because ``num_batches_tracked`` alone may be
    missing (checkpoints saved with frozen batch norm, like torchvision's detection models,
    lack it; inference never reads it), and because some libraries' ``load_state_dict``
    (segmentation_models_pytorch) silently drop mis-shaped entries when not strict.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} in file vs {tuple(tensor.shape)} in model"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = [
        f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})"
        for kind, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped tensors", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"weights file {source} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=False)
