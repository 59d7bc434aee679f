"""``OpenVinoEnsemble``: the exported ensemble graph on OpenVINO (CPU), bf16 where the CPU has it, no PyTorch.

OpenVINO reads the same ONNX files as ONNX Runtime (``onnx/model.onnx``, ``onnx/model.int8.onnx``)
and returns the same outputs. On CPUs with bf16 units (AMX, AVX-512 BF16) its default here is
``precision="bf16"``: convolutions in bfloat16, about three significant digits, checked against the
float32 graph by ``benchmarks/inference.py`` and the tests. OpenVINO does not constant-fold the
bit-mask decoding of a compact graph (``export.compact``), so this engine rebuilds those weights
once, in numpy, before compiling. Install with ``pip install 'freetickets-hub[openvino]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.masks import scatter_values, unpack_mask
from freetickets_hub.artifact.names import METADATA_NUM_MEMBERS, METADATA_TEMPERATURE
from freetickets_hub.engines.base import GraphEngine
from freetickets_hub.engines.onnxruntime import importable, resolve_graph
from freetickets_hub.errors import ArtifactError

__all__ = ["PRECISIONS", "OpenVinoEnsemble", "has_openvino"]

PRECISIONS = ("bf16", "f32")
_COMPACT_PREFIX = "freetickets.compact."  # names of export.compact's constants
_INSTALL_HINT = "pip install 'freetickets-hub[openvino]'"
_INPUT_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16)}  # OpenVINO's element types


def has_openvino(necessary: bool = False) -> bool:
    """Whether openvino can be imported; with ``necessary=True`` raise a helpful error instead of False.

    Raises:
        MissingDependencyError: ``necessary`` is set and openvino is not installed.
    """
    return importable("openvino", engine="OpenVinoEnsemble", hint=_INSTALL_HINT, necessary=necessary)


class OpenVinoEnsemble(GraphEngine):
    """An exported ensemble graph compiled by OpenVINO: the ``GraphEngine`` interface of ``OnnxEnsemble``.

    Args:
        graph_path: ``onnx/model.onnx`` or ``onnx/model.int8.onnx``.
        config: the ensemble's config (preprocessing, label names, temperature to check against).
        device: an OpenVINO device, ``"CPU"`` by default.
        precision: ``"bf16"`` (default where the device supports it, else ``"f32"``) or ``"f32"``; the
            inference precision of the float parts (int8 graphs keep their int8 layers).
        num_threads: inference threads (default: OpenVINO's choice).

    Raises:
        MissingDependencyError: openvino is missing.
        ValueError: an unknown precision, or bf16 on a device without it.
        ArtifactError: the graph cannot be read or does not match ``config``.

    Example:
        >>> engine = OpenVinoEnsemble.from_pretrained("runs/tiny", variant="int8")  # doctest: +SKIP
        >>> engine.predict(images).labels  # doctest: +SKIP
    """

    def __init__(
        self,
        graph_path: str | os.PathLike[str],
        config: EnsembleConfig,
        *,
        device: str = "CPU",
        precision: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        has_openvino(necessary=True)
        import openvino as ov

        self.config = config
        core = ov.Core()
        capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
        precision = precision or ("bf16" if "BF16" in capabilities else "f32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16" and "BF16" not in capabilities:
            raise ValueError(f"OpenVINO device {device!r} has no bf16 support (capabilities {capabilities})")
        try:
            model = core.read_model(str(graph_path))
        except RuntimeError as err:
            raise ArtifactError(f"OpenVINO cannot read {graph_path}: {err}") from err
        self.folded_weights = _fold_compact_weights(model, ov)
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.device, self.precision = device, precision
        self._compiled = core.compile_model(model, device, properties)
        self._request = self._compiled.create_infer_request()
        port = model.inputs[0]
        shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        self.input_name, self.input_shape = port.get_any_name(), tuple(shape[1:])
        self.input_dtype = _INPUT_DTYPES.get(port.get_element_type().to_string(), np.dtype(object))
        self.output_names = [out.get_any_name() for out in self._compiled.outputs]
        self._check_graph(graph_path, shape, _metadata(model))

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike[str],
        *,
        variant: str = "fp32",
        device: str = "CPU",
        precision: str | None = None,
        num_threads: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> OpenVinoEnsemble:
        """Load ``config.json`` and the ``variant`` graph (``fp32`` or ``int8``) from a folder or a Hub repo."""
        download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download)
        graph, config = resolve_graph(repo_or_dir, variant, **download, token=token, local_files_only=local_files_only)
        return cls(graph, config, device=device, precision=precision, num_threads=num_threads)

    @property
    def providers(self) -> list[str]:
        """``["OpenVINO <device> <precision>"]``, the counterpart of ``OnnxEnsemble.providers``."""
        return [f"OpenVINO {self.device} {self.precision}"]

    def _run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        results = self._request.infer({0: pixel_values})
        return {
            name: np.array(results[port]) for name, port in zip(self.output_names, self._compiled.outputs, strict=True)
        }


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props``, which OpenVINO's ONNX reader keeps under the ``framework`` runtime info."""
    if not model.has_rt_info("framework"):
        return {}
    info = model.get_rt_info()["framework"]
    return {key: info[key].astype(str) for key in (METADATA_TEMPERATURE, METADATA_NUM_MEMBERS) if key in info}


def _fold_compact_weights(model: Any, ov: Any) -> int:
    """Replace each bit-mask decoding subgraph of ``export.compact`` by its dense constant; return how many.

    The decoding ends in a ``Reshape`` to ``<stem>.shape``; the dense tensor is the values scattered
    to the set bits of ``<stem>.mask`` (decoded by ``artifact.masks``), as the graph computes it.
    """
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    count = 0
    for op in model.get_ops():
        if op.get_type_name() != "Reshape":
            continue
        name = op.input_value(1).get_node().get_friendly_name()
        if not (name.startswith(_COMPACT_PREFIX) and name.endswith(".shape")):
            continue
        stem = name.removesuffix(".shape")
        shape = tuple(int(d) for d in constants[name].get_data())
        mask = unpack_mask(constants[f"{stem}.mask"].get_data(), shape, name=f"{stem}.mask")
        dense = scatter_values(mask, constants[f"{stem}.values"].get_data())
        op.output(0).replace(ov.opset13.constant(dense).output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
