"""Errors raised while resolving and loading a model, each naming what the caller must fix."""

from __future__ import annotations

from segflow.errors import SegflowError


class UnknownModelError(SegflowError, ValueError):
    """The spec is neither a registered model name nor a path to an exported model."""


class ModelCardError(SegflowError, ValueError):
    """An exported model's card is missing, unreadable, or has an invalid field."""


class MissingWeightsError(SegflowError, FileNotFoundError):
    """Pretrained weights were asked for (explicitly or by default) but are not on disk."""


class MissingDependencyError(SegflowError, ImportError):
    """The model needs an optional dependency that is not installed."""


class UnsafeModelError(SegflowError, ValueError):
    """A model file that would run code it carries when loaded (a pickle, compiled code)."""


class ModelIntegrityError(SegflowError, ValueError):
    """A model file whose bytes are not those expected (its sha256 differs)."""
