"""ONNX export of a whole ensemble (installed as ``freetickets_hub.export``).

Needs torch and onnx (``pip install 'freetickets-hub[export]'``); the exported graph runs without
them on :class:`freetickets_hub.OnnxEnsemble`.
"""

from .graph import EnsembleGraph, export_graph
from .onnx import ExportReport, export_onnx

__all__ = ["EnsembleGraph", "ExportReport", "export_graph", "export_onnx"]
