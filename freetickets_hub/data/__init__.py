"""Image data: the one loader (any ``datasets`` source or a built-in set, as uint8 tensors) and the one
validation carve a training run holds out, which ``calibrate`` finds again.

Needs the ``train`` extra (``datasets``) for anything but the built-in sets.
"""

from __future__ import annotations

from .carve import Carve, run_validation_rows, validation_carve
from .images import (
    UNKNOWN_LABEL,
    EvalSplit,
    channels_first,
    decode_images,
    fit_images,
    is_input_sized,
    load_eval_split,
)
from .sources import BUILTIN_SOURCES, DATASETS_ENV, load_split, public_dataset, resolve_dataset

__all__ = [
    "BUILTIN_SOURCES",
    "DATASETS_ENV",
    "UNKNOWN_LABEL",
    "Carve",
    "EvalSplit",
    "channels_first",
    "decode_images",
    "fit_images",
    "is_input_sized",
    "load_eval_split",
    "load_split",
    "public_dataset",
    "resolve_dataset",
    "run_validation_rows",
    "validation_carve",
]
