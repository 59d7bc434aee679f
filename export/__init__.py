"""ONNX export of a whole ensemble (installed as ``freetickets_hub.export``).

Needs torch and onnx (``pip install 'freetickets-hub[export]'``); the exported graph runs without
them on :class:`freetickets_hub.OnnxEnsemble`.
"""

from .graph import EnsembleGraph, export_graph
from .onnx import ExportReport, export_onnx
from .quantize import Int8Calibration, QuantizeReport

__all__ = ["EnsembleGraph", "ExportReport", "Int8Calibration", "QuantizeReport", "export_graph", "export_onnx"]
