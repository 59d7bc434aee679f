"""The model behind the service, by backend name: ``onnx`` (``OnnxEnsemble``, default, torch-free),
``openvino`` (``OpenVinoEnsemble``, torch-free) or ``torch`` (``EnsembleModel``), one interface.

Every engine takes preprocessed ``pixel_values`` ``(B, C, H, W)`` float32 and return the DESIGN.md
outputs by name. The tensor names, datatypes and shapes the Open Inference Protocol advertises come
from the engine itself (a warm-up call), so they are those of the ONNX graph.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.hub import resolve_file
from freetickets_hub.artifact.names import CONFIG_NAME, INPUT_NAME, ONNX_VARIANTS
from freetickets_hub.engines.onnxruntime import variant_graph_name
from freetickets_hub.errors import ArtifactError, FreeTicketsError

__all__ = ["BACKENDS", "ServingEngine", "TensorSpec", "check_graph", "check_model", "load_engine"]

BACKENDS = ("onnx", "openvino", "torch")
_GRAPH_BACKENDS = ("onnx", "openvino")  # those that run the exported graph (and have its variants)
_MEMBER_AXIS_OUTPUTS = ("member_probs",)  # (M, B, K): the batch is axis 1; every other output is batch-first
_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64"}
_VERSIONED = ("freetickets-hub", "numpy", "onnxruntime", "onnxruntime-gpu", "fastapi", "uvicorn", "torch", "timm")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's interface: its name, OIP datatype, shape (-1: the batch) and batch axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    batch_axis: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class ServingEngine:
    """A loaded, warmed-up model: call it on a batch; its interface and provenance for metadata."""

    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    config: EnsembleConfig
    backend: str
    input: TensorSpec
    outputs: list[TensorSpec] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)  # ONNX Runtime providers active in the session

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(pixel_values)

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


def check_model(model: str | os.PathLike[str], backend: str = "onnx", variant: str = "fp32") -> EnsembleConfig:
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
    config = check_model(model, backend, variant)
    run, providers = _LOADERS[backend](model, variant)
    channels, height, width = config.pretrained_cfg["input_size"]
    warm = run(np.zeros((2, channels, height, width), np.float32))  # also the first, slow call
    num_members, num_classes = config.ensemble.num_members, config.num_classes
    expected = {"logits": (2, num_classes), "probs": (2, num_classes), "member_probs": (num_members, 2, num_classes)}
    outputs = []
    for name, value in warm.items():
        shape = expected.get(name, (2,))
        if value.shape != shape or value.dtype not in _DATATYPES:
            raise ArtifactError(f"{model}: output {name!r} is {value.dtype} {value.shape} at batch 2, expected {shape}")
        axis = 1 if name in _MEMBER_AXIS_OUTPUTS else 0
        dims = tuple(-1 if i == axis else d for i, d in enumerate(value.shape))
        outputs.append(TensorSpec(name, _DATATYPES[value.dtype], dims, axis))
    spec = TensorSpec(INPUT_NAME, "FP32", (-1, channels, height, width))
    return ServingEngine(run, config, backend, spec, outputs, providers)


_Loaded = tuple[Callable[[np.ndarray], dict[str, np.ndarray]], list[str]]  # the engine and where it runs


def _load_onnx(model: str | os.PathLike[str], variant: str) -> _Loaded:
    from freetickets_hub.engines.onnxruntime import OnnxEnsemble

    engine = OnnxEnsemble.from_pretrained(model, variant=variant, session_options=_session_options())
    return engine, engine.providers


def _load_openvino(model: str | os.PathLike[str], variant: str) -> _Loaded:
    from freetickets_hub.engines.openvino import OpenVinoEnsemble

    engine = OpenVinoEnsemble.from_pretrained(model, variant=variant)
    return engine, engine.providers


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


def _load_torch(model: str | os.PathLike[str], variant: str) -> _Loaded:
    import torch

    from freetickets_hub.model.ensemble import EnsembleModel
    from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ensemble = EnsembleModel.from_pretrained(model, map_location=device).eval()

    @torch.inference_mode()
    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        out = ensemble(torch.from_numpy(pixel_values).to(device))
        return {name: t.float().cpu().numpy() for name, t in zip(OUTPUT_NAMES, out.to_tuple(), strict=True)}

    return run, []


_LOADERS: dict[str, Callable[[str | os.PathLike[str], str], _Loaded]] = {
    "onnx": _load_onnx,
    "openvino": _load_openvino,
    "torch": _load_torch,
}
