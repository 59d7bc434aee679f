"""``freetickets serve``: an HTTP service for an ensemble, in two dialects on one port.

``/v1/predict`` (image files or base64 in, labels with uncertainty out), the Open Inference
Protocol v2 (``/v2/...``, what KServe, Triton and ``tritonclient`` speak), ``/v1/metadata``,
``/metrics`` and a page at ``/``, over a micro-batcher with a bounded queue. The default onnx
backend imports neither torch nor ``freetickets_hub.training`` / ``freetickets_hub.export``.
Needs the ``serve`` extra: ``pip install 'freetickets-hub[serve]'``.
"""

from __future__ import annotations

from .batcher import BatchResult, MicroBatcher
from .service import ServeSettings, Service

__all__ = ["BatchResult", "MicroBatcher", "ServeSettings", "Service"]
