"""FreeTickets Hub: sparse deep ensembles on timm, on the Hugging Face Hub and ONNX Runtime.

``import freetickets_hub`` imports no torch: torch-backed names load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "EnsembleModel": "freetickets_hub.model.ensemble",
    "EnsembleOutput": "freetickets_hub.uncertainty.outputs",
    "combine_member_logits": "freetickets_hub.uncertainty.outputs",
    "EnsembleConfig": "freetickets_hub.artifact.config",
    "EnsembleInfo": "freetickets_hub.artifact.config",
    "CalibrationConfig": "freetickets_hub.artifact.config",
    "Predictions": "freetickets_hub.uncertainty.predictions",
    "preprocess": "freetickets_hub.engines.preprocessing",
    "OnnxEnsemble": "freetickets_hub.engines.onnxruntime",
}
_ERRORS = (
    "ArtifactError",
    "ConfigError",
    "DatasetError",
    "ExportError",
    "FreeTicketsError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "OutputDirError",
    "RecipeError",
)

__all__ = ["__version__", *_LAZY, *_ERRORS]

if TYPE_CHECKING:
    from freetickets_hub.artifact.config import CalibrationConfig as CalibrationConfig
    from freetickets_hub.artifact.config import EnsembleConfig as EnsembleConfig
    from freetickets_hub.artifact.config import EnsembleInfo as EnsembleInfo
    from freetickets_hub.engines.onnxruntime import OnnxEnsemble as OnnxEnsemble
    from freetickets_hub.engines.preprocessing import preprocess as preprocess
    from freetickets_hub.model.ensemble import EnsembleModel as EnsembleModel
    from freetickets_hub.uncertainty.outputs import EnsembleOutput as EnsembleOutput
    from freetickets_hub.uncertainty.outputs import combine_member_logits as combine_member_logits
    from freetickets_hub.uncertainty.predictions import Predictions as Predictions

    from .errors import ArtifactError as ArtifactError
    from .errors import ConfigError as ConfigError
    from .errors import DatasetError as DatasetError
    from .errors import ExportError as ExportError
    from .errors import FreeTicketsError as FreeTicketsError
    from .errors import MissingDependencyError as MissingDependencyError
    from .errors import ModelNotFoundError as ModelNotFoundError
    from .errors import OutputDirError as OutputDirError
    from .errors import RecipeError as RecipeError


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        return getattr(importlib.import_module("freetickets_hub.errors"), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freetickets_hub' has no attribute {name!r}")
