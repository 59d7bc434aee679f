"""Evaluation of an ensemble on any image dataset: quality, calibration, OOD, corruptions, diversity.

Needs the ``train`` extra (accelerate, datasets) and matplotlib for plots. Launch it on several
processes with ``accelerate launch -m freetickets_hub.cli evaluate ...``; the numbers are the same.
"""

from __future__ import annotations

from freetickets_hub.artifact.names import EVAL_RESULTS_NAME
from freetickets_hub.data import BUILTIN_SOURCES, UNKNOWN_LABEL, EvalSplit, load_eval_split

from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionTransform, corrupt
from .diversity import mask_distance, prediction_diversity
from .inference import Inference, create_accelerator, run_inference
from .ood_suite import SHIFTS, SUITE_KINDS, SYNTHETIC, ood_kind, shifted_images, synthetic_images
from .plots import PLOT_NAMES, write_plots
from .report import format_results, write_results
from .suite import CONVENTIONS, OOD_SCORES, evaluate

__all__ = [
    "BUILTIN_SOURCES",
    "CONVENTIONS",
    "CORRUPTIONS",
    "EVAL_RESULTS_NAME",
    "OOD_SCORES",
    "PLOT_NAMES",
    "SEVERITIES",
    "SHIFTS",
    "SUITE_KINDS",
    "SYNTHETIC",
    "UNKNOWN_LABEL",
    "CorruptionTransform",
    "EvalSplit",
    "Inference",
    "corrupt",
    "create_accelerator",
    "evaluate",
    "format_results",
    "load_eval_split",
    "mask_distance",
    "ood_kind",
    "prediction_diversity",
    "run_inference",
    "shifted_images",
    "synthetic_images",
    "write_plots",
    "write_results",
]
