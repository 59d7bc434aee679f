"""Triton Python-backend model: the ensemble through ``OnnxEnsemble``, as ``freetickets serve`` runs it.

``freetickets export triton --backend python`` copies this file to ``<repo>/<name>/1/model.py``
beside ``config.json`` (label names, temperature, the selective-prediction rule) and
``onnx/model.onnx``: the version folder is an ONNX-only saved ensemble. Triton's Python backend
imports it with ``triton_python_backend_utils`` on its path; the ``freetickets-hub[onnx]`` install
(torch-free) must be importable by the backend's stub. Each call runs the requests the dynamic
batcher gathered as one batch, then answers every request with its own rows. ``abstain`` (``[B]``
bool) and ``prediction_set`` (``[B, K]`` bool membership) come from
:func:`freetickets_hub.uncertainty.selective.decide`, the function ``freetickets serve`` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from freetickets_hub import OnnxEnsemble
from freetickets_hub.uncertainty.selective import decide

INPUT_NAME = "pixel_values"


class TritonPythonModel:
    """The interface Triton's Python backend calls: ``initialize`` once, ``execute`` per batch."""

    def initialize(self, args: dict[str, Any]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as freetickets serve
        self.engine = OnnxEnsemble.from_pretrained(folder, session_options=options)
        self.output_names = [out["name"] for out in json.loads(args["model_config"])["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        # through DLPack both ways: under numpy 2 the stub of Triton 2.51 misreads arrays' item sizes in
        # Tensor.as_numpy() and pb_utils.Tensor(name, array)
        pixels = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, INPUT_NAME)) for r in requests]
        outputs = dict(self.engine(np.concatenate(pixels)))
        abstain, sets = decide(outputs, self.engine.config.ensemble.selective)
        if abstain is not None:
            outputs["abstain"] = abstain
        if sets is not None:
            members = np.zeros(outputs["probs"].shape, dtype=bool)  # (B, K)
            for row, labels in enumerate(sets):
                members[row, labels] = True
            outputs["prediction_set"] = members
        responses, start = [], 0
        for batch in pixels:
            rows = slice(start, start + len(batch))
            tensors = [
                pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(outputs[n][rows])) for n in self.output_names
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += len(batch)
        return responses
