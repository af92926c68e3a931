"""Every segmentation model behind one call: ``load_model(spec).predict(images)``.

``spec`` is a registered name (see :func:`available_models`) or the path of an exported
``.pt2`` / ``.onnx`` model with its card beside it. Heavy backends are imported on first use.
"""

from segflow.models.base import SegmentationModel
from segflow.models.errors import (
    MissingDependencyError,
    MissingWeightsError,
    ModelCardError,
    ModelIntegrityError,
    UnknownModelError,
    UnsafeModelError,
)
from segflow.models.integrity import ModelFile
from segflow.models.registry import ModelInfo, available_models, load_model, model_file
from segflow.models.semantic import SemanticModel
from segflow.models.weights import RANDOM_WEIGHTS

__all__ = [
    "RANDOM_WEIGHTS",
    "MissingDependencyError",
    "MissingWeightsError",
    "ModelCardError",
    "ModelFile",
    "ModelInfo",
    "ModelIntegrityError",
    "SegmentationModel",
    "SemanticModel",
    "UnknownModelError",
    "UnsafeModelError",
    "available_models",
    "load_model",
    "model_file",
]
