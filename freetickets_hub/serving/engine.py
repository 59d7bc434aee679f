"""The model behind the service, by backend name: ``onnx`` (``OnnxEnsemble``, default, torch-free),
``openvino`` (``OpenVinoEnsemble``, torch-free) or ``torch`` (``TorchEngine`` over ``EnsembleModel``).

Every backend is an ``engines.base.Engine``: it takes preprocessed ``pixel_values`` ``(B, C, H, W)``
float32, returns the DESIGN.md outputs by name, and declares its input and output specs (KServe's
``Model`` style). The tensor names, datatypes and shapes the Open Inference Protocol advertises are
those declarations; the warm-up call checks that the engine keeps them.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.hub import resolve_file
from freetickets_hub.artifact.names import CONFIG_NAME, ONNX_VARIANTS
from freetickets_hub.engines.base import DATATYPES, Engine, TensorSpec
from freetickets_hub.engines.onnxruntime import variant_graph_name
from freetickets_hub.errors import ArtifactError, FreeTicketsError

__all__ = ["BACKENDS", "ServingEngine", "TensorSpec", "check_backend_files", "check_graph", "load_engine"]

BACKENDS = ("onnx", "openvino", "torch")
_GRAPH_BACKENDS = ("onnx", "openvino")  # those that run the exported graph (and have its variants)
_VERSIONED = ("freetickets-hub", "numpy", "onnxruntime", "onnxruntime-gpu", "fastapi", "uvicorn", "torch", "timm")


@dataclass
class ServingEngine:
    """A loaded, warmed-up engine: call it on a batch; its declared interface and provenance for metadata."""

    engine: Engine
    backend: str

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.engine(pixel_values)

    @property
    def config(self) -> EnsembleConfig:
        return self.engine.config

    @property
    def input(self) -> TensorSpec:
        return self.engine.input_spec

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.engine.output_specs

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime providers active in the session, OpenVINO's device; none for torch."""
        return self.engine.providers

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def versions(self) -> dict[str, str]:
        """Versions of the packages that produce the answers (those installed)."""
        found = {"python": platform.python_version()}
        for name in _VERSIONED:
            if name in ("torch", "timm") and self.backend != "torch":
                continue  # the graph backends never load them
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return found

    def warm_up(self, model: str | os.PathLike[str]) -> None:
        """The first (slow) call, at batch 2; every output must be what the engine declares.

        Raises:
            ArtifactError: an output of another dtype or shape than declared, or a missing or extra one.
        """
        spec = self.input
        batch = np.zeros((2, *spec.shape[1:]), np.float32)
        warm = self(batch)
        declared = {out.name: out for out in self.outputs}
        for name in declared.keys() | warm.keys():
            out = declared.get(name)
            value = warm.get(name)
            shape = tuple(2 if d == -1 else d for d in out.shape) if out else None
            if out is None or value is None or value.shape != shape or DATATYPES.get(value.dtype) != out.datatype:
                got = "missing" if value is None else f"{value.dtype} {value.shape}"
                raise ArtifactError(f"{model}: output {name!r} is {got} at batch 2, expected {shape or 'none'}")


def check_backend_files(model: str | os.PathLike[str], backend: str = "onnx", variant: str = "fp32") -> EnsembleConfig:
    """The model's config, once the files ``backend`` needs are found (fetched for a Hub id).

    ``variant`` picks the graph backends' graph: ``fp32`` (``onnx/model.onnx``) or ``int8``
    (``onnx/model.int8.onnx``).

    Raises:
        FreeTicketsError: unknown backend or variant, no ``config.json``, or (onnx, openvino) no graph of
            that variant; the last names the ``freetickets export onnx`` command that writes it.
    """
    from huggingface_hub.errors import EntryNotFoundError

    if backend not in BACKENDS:
        raise FreeTicketsError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    try:
        config = EnsembleConfig.from_json_file(str(resolve_file(model, CONFIG_NAME)))
    except (FileNotFoundError, EntryNotFoundError) as err:
        raise FreeTicketsError(f"{model} is not a saved ensemble: {err}") from err
    if variant not in ONNX_VARIANTS:
        raise FreeTicketsError(f"unknown graph variant {variant!r}; choose from {sorted(ONNX_VARIANTS)}")
    if backend not in _GRAPH_BACKENDS and variant != "fp32":
        raise FreeTicketsError(f"--variant {variant} is a graph of the onnx backend, not of --backend {backend}")
    if backend in _GRAPH_BACKENDS:
        graph = variant_graph_name(variant)
        try:
            resolve_file(model, graph)
        except (FileNotFoundError, EntryNotFoundError) as err:
            export = f"freetickets export onnx {model}" + (
                " --quantize int8 --calibration-dataset DS" if variant == "int8" else ""
            )
            raise FreeTicketsError(
                f"{model} has no {graph}: run `{export}` first, or serve it with --backend torch"
            ) from err
    return config


def load_engine(model: str | os.PathLike[str], backend: str = "onnx", variant: str = "fp32") -> ServingEngine:
    """Load ``model`` (a folder or a Hub id; ``HF_HUB_OFFLINE`` honoured) and warm it up.

    Raises:
        FreeTicketsError: unknown backend, no ``onnx/model.onnx`` for the onnx backend (the message
            names ``freetickets export onnx``), or a model whose outputs are not the DESIGN.md ones.
    """
    check_backend_files(model, backend, variant)
    serving = ServingEngine(_LOADERS[backend](model, variant), backend)
    serving.warm_up(model)
    return serving


def _load_onnx(model: str | os.PathLike[str], variant: str) -> Engine:
    from freetickets_hub.engines.onnxruntime import OnnxEnsemble

    return OnnxEnsemble.from_pretrained(model, variant=variant, session_options=_session_options())


def _load_openvino(model: str | os.PathLike[str], variant: str) -> Engine:
    from freetickets_hub.engines.openvino import OpenVinoEnsemble

    return OpenVinoEnsemble.from_pretrained(model, variant=variant)


def check_graph(model: str | os.PathLike[str], variant: str = "fp32") -> None:
    """Parse the onnx backend's graph once, so that a corrupt file is refused before the port is bound.

    The session is built without graph optimisations and dropped (the worker builds its own).

    Raises:
        ArtifactError: the file is not a valid ONNX graph; the message names the export command.
    """
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    graph = variant_graph_name(variant)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(resolve_file(model, graph)), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidGraph, InvalidProtobuf) as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise ArtifactError(
            f"{model}: {graph} is not a valid ONNX graph ({reason}); re-run `freetickets export onnx {model}`"
        ) from None


def _session_options() -> Any:
    """Worker threads that sleep instead of spinning between batches (they would steal the HTTP side's CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _load_torch(model: str | os.PathLike[str], variant: str) -> Engine:
    from freetickets_hub.engines.pytorch import TorchEngine

    return TorchEngine.from_pretrained(str(model))


_LOADERS: dict[str, Callable[[str | os.PathLike[str], str], Engine]] = {
    "onnx": _load_onnx,
    "openvino": _load_openvino,
    "torch": _load_torch,
}
