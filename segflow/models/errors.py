"""Errors raised while resolving and loading a model, each naming what the caller must fix."""

from __future__ import annotations


class UnknownModelError(ValueError):
    """The spec is neither a registered model name nor a path to an exported model."""


class ModelCardError(ValueError):
    """An exported model's card is missing, unreadable, or has an invalid field."""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights were asked for (explicitly or by default) but are not on disk."""


class MissingDependencyError(ImportError):
    """The model needs an optional dependency that is not installed."""
