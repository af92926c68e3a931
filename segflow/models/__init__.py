"""Every segmentation model behind one call: ``load_model(spec).predict(images)``.

``spec`` is a registered name (see :func:`available_models`) or the path of an exported
``.pt2`` / ``.onnx`` model with its card beside it. Heavy backends are imported on first use.
"""

from segflow.models.base import SegmentationModel
from segflow.models.errors import (
    MissingDependencyError,
    MissingWeightsError,
    ModelCardError,
    UnknownModelError,
)
from segflow.models.registry import ModelInfo, available_models, load_model
from segflow.models.semantic import SemanticModel
from segflow.models.weights import RANDOM_WEIGHTS

__all__ = [
    "RANDOM_WEIGHTS",
    "MissingDependencyError",
    "MissingWeightsError",
    "ModelCardError",
    "ModelInfo",
    "SegmentationModel",
    "SemanticModel",
    "UnknownModelError",
    "available_models",
    "load_model",
]
