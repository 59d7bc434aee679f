"""FreeTickets Hub: sparse deep ensembles on timm, on the Hugging Face Hub and ONNX Runtime.

``import freetickets_hub`` imports no torch: torch-backed names load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "EnsembleModel": "freetickets_hub.ensemble",
    "EnsembleOutput": "freetickets_hub.outputs",
    "combine_member_logits": "freetickets_hub.outputs",
    "EnsembleConfig": "freetickets_hub.config",
    "EnsembleInfo": "freetickets_hub.config",
    "CalibrationConfig": "freetickets_hub.config",
    "Predictions": "freetickets_hub.predictions",
    "preprocess": "freetickets_hub.preprocessing",
    "OnnxEnsemble": "freetickets_hub.runtime",
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
    from .config import CalibrationConfig as CalibrationConfig
    from .config import EnsembleConfig as EnsembleConfig
    from .config import EnsembleInfo as EnsembleInfo
    from .ensemble import EnsembleModel as EnsembleModel
    from .errors import ArtifactError as ArtifactError
    from .errors import ConfigError as ConfigError
    from .errors import DatasetError as DatasetError
    from .errors import ExportError as ExportError
    from .errors import FreeTicketsError as FreeTicketsError
    from .errors import MissingDependencyError as MissingDependencyError
    from .errors import ModelNotFoundError as ModelNotFoundError
    from .errors import OutputDirError as OutputDirError
    from .errors import RecipeError as RecipeError
    from .outputs import EnsembleOutput as EnsembleOutput
    from .outputs import combine_member_logits as combine_member_logits
    from .predictions import Predictions as Predictions
    from .preprocessing import preprocess as preprocess
    from .runtime import OnnxEnsemble as OnnxEnsemble


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        return getattr(importlib.import_module("freetickets_hub.errors"), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freetickets_hub' has no attribute {name!r}")
