"""Which bytes a model is, and loads that check they read those bytes.

A run records the sha256 of its model file, and every process that loads the model (the
driver, each actor) reads the file once, checks the bytes against that hash, and builds the
model from those same bytes: a file replaced during a run fails the loads that see the new
one, rather than mixing two models in one run's output.

The model file of a spec (:func:`segflow.models.registry.model_file`):

- an exported ``.pt2`` / ``.onnx``: that file, which holds the graph and its weights;
- a registered name given ``weights=<file>``: that file;
- a registered torchvision name with its default pretrained weights: the checkpoint in the
  torch hub cache;
- random weights (``weights="none"``): none. The network code of a registered model is the
  installed torchvision or segmentation_models_pytorch, which the hash does not cover.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from segflow.models.errors import ModelIntegrityError

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelFile:
    """A model's file and the sha256 of its bytes (lowercase hex)."""

    path: Path
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> ModelFile:
        path = Path(path)
        return cls(path, sha256_hex(path.read_bytes()))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked_sha256(value: str) -> str:
    """An expected hash as given (any case), normalised; refused unless 64 hex digits."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise ModelIntegrityError(f"a model sha256 must be 64 hex digits, got {value!r}")
    return value.lower()


def read_verified(path: Path, sha256: str | None) -> bytes:
    """The bytes of ``path``, read once; with ``sha256``, they must hash to it."""
    data = path.read_bytes()
    if sha256 is not None:
        expected = checked_sha256(sha256)
        actual = sha256_hex(data)
        if actual != expected:
            raise ModelIntegrityError(
                f"model file {path} has sha256 {actual}, expected {expected}: the file is "
                f"not the one this run (or --model-sha256) was made for"
            )
    return data
