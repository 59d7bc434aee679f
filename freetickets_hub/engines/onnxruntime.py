"""``OnnxEnsemble``: run an exported ensemble graph with ONNX Runtime, without PyTorch.

Serving needs only onnxruntime, numpy and PIL: this module never imports torch, and it imports
onnxruntime when an engine is built, so ``import freetickets_hub.engines.onnxruntime`` works without it.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.hub import resolve_file
from freetickets_hub.artifact.names import CONFIG_NAME, ONNX_DATA_NAME, ONNX_VARIANTS
from freetickets_hub.engines.base import GraphEngine
from freetickets_hub.errors import ArtifactError, MissingDependencyError

__all__ = [
    "DEFAULT_PROVIDERS",
    "OnnxEnsemble",
    "has_onnxruntime",
    "resolve_graph",
    "variant_graph_name",
]

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_INPUT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}  # ORT's spelling
_INSTALL_HINT = "pip install 'freetickets-hub[onnx]' (CPU) or 'freetickets-hub[gpu]' (CUDA)"
_GPU_HINT = "install onnxruntime-gpu with pip install 'freetickets-hub[gpu]' on a machine with CUDA"

ProviderSpec = str | tuple[str, dict[str, Any]]


def importable(module: str, *, engine: str, hint: str, necessary: bool = False) -> bool:
    """Whether ``module`` imports; with ``necessary=True`` raise an error naming ``engine`` and ``hint`` instead.

    Raises:
        MissingDependencyError: ``necessary`` is set and ``module`` is not installed.
    """
    try:
        importlib.import_module(module)
    except ImportError as err:
        if necessary:
            raise MissingDependencyError(f"{engine} needs {module}: {hint}") from err
        return False
    return True


def has_onnxruntime(necessary: bool = False) -> bool:
    """Whether onnxruntime can be imported; with ``necessary=True`` raise a helpful error instead of False.

    Raises:
        MissingDependencyError: ``necessary`` is set and onnxruntime is not installed.
    """
    return importable("onnxruntime", engine="OnnxEnsemble", hint=_INSTALL_HINT, necessary=necessary)


class OnnxEnsemble(GraphEngine):
    """An exported ensemble (``onnx/model.onnx``) on ONNX Runtime, with the outputs of ``EnsembleModel``.

    Args:
        graph_path: the exported graph; its external data, if any, must sit beside it.
        config: the ensemble's config (preprocessing, label names, temperature to check against).
        providers: ONNX Runtime execution providers, names or ``(name, options)`` pairs, in order of
            preference. ``None``: TensorRT, CUDA, CPU, keeping those this onnxruntime offers.
        allow_cpu_fallback: run on CPU when an explicitly requested GPU provider is not usable,
            instead of raising.
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimisation level...).

    Raises:
        MissingDependencyError: onnxruntime is missing, or a requested provider is not active.
        ArtifactError: the graph cannot be loaded or does not match ``config``.

    Example:
        >>> engine = OnnxEnsemble.from_pretrained("runs/tiny")  # doctest: +SKIP
        >>> engine.predict(images).labels  # doctest: +SKIP
    """

    def __init__(
        self,
        graph_path: str | os.PathLike[str],
        config: EnsembleConfig,
        *,
        providers: Sequence[ProviderSpec] | None = None,
        allow_cpu_fallback: bool = False,
        session_options: Any = None,
    ) -> None:
        has_onnxruntime(necessary=True)
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        self.config = config
        if os.path.isfile(graph_path) and os.path.getsize(graph_path) == 0:
            raise ArtifactError(
                f"{graph_path} is empty (0 bytes): an interrupted export? Re-run `freetickets export onnx`"
            )
        chosen, requested = _select_providers(ort.get_available_providers(), providers, allow_cpu_fallback)
        try:
            self._session = ort.InferenceSession(str(graph_path), sess_options=session_options, providers=chosen)
        except (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidProtobuf, ort_state.NoSuchFile) as err:
            raise ArtifactError(f"ONNX Runtime cannot load {graph_path}: {err}") from err
        active = self._session.get_providers()
        inactive = [name for name in requested if name not in active]  # ORT drops a provider that fails to start
        if inactive:
            message = f"requested execution provider(s) {inactive} are not active in the session (active: {active})"
            if not allow_cpu_fallback:
                raise MissingDependencyError(
                    f"{message}; check the CUDA/TensorRT libraries, or pass allow_cpu_fallback=True to run on CPU"
                )
            logger.warning("%s; falling back as allowed", message)
        graph_input = self._session.get_inputs()[0]
        self.input_name, self.input_dtype = graph_input.name, _INPUT_DTYPES.get(graph_input.type, np.dtype(object))
        self.input_shape = tuple(graph_input.shape[1:])
        self.output_names = [out.name for out in self._session.get_outputs()]
        self._check_graph(graph_path, graph_input.shape, self._session.get_modelmeta().custom_metadata_map)
        # on a GPU the input and outputs are bound explicitly (IO binding): ORT allocates the outputs on
        # the device and they are copied back once, after the run
        self._io_device = "cuda" if active[0] in _GPU_PROVIDERS else None
        options = self._session.get_provider_options().get(active[0], {})
        self._device_id = int(options.get("device_id", 0))

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike[str],
        *,
        providers: Sequence[ProviderSpec] | None = None,
        allow_cpu_fallback: bool = False,
        session_options: Any = None,
        variant: str = "fp32",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> OnnxEnsemble:
        """Load from a local folder or a Hub repo, fetching only ``config.json`` and the graph files.

        ``variant`` picks the graph: ``"fp32"`` (``onnx/model.onnx``) or ``"int8"``
        (``onnx/model.int8.onnx``, written by ``freetickets export onnx --quantize int8``). The graph's
        external data file (``onnx/model.onnx.data``) is fetched only when the graph refers to it.
        Other arguments are those of :class:`OnnxEnsemble` and ``hf_hub_download``.

        Raises:
            ValueError: an unknown ``variant``.
        """
        download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download)
        graph, config = resolve_graph(repo_or_dir, variant, **download, token=token, local_files_only=local_files_only)
        return cls(
            graph, config, providers=providers, allow_cpu_fallback=allow_cpu_fallback, session_options=session_options
        )

    @property
    def providers(self) -> list[str]:
        """The execution providers active in the session, in order of preference."""
        return self._session.get_providers()

    def _run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        if self._io_device is None:
            outputs = self._session.run(self.output_names, {self.input_name: pixel_values})
            return dict(zip(self.output_names, outputs, strict=True))
        binding = self._session.io_binding()
        binding.bind_cpu_input(self.input_name, pixel_values)
        for name in self.output_names:
            binding.bind_output(name, self._io_device, self._device_id)
        self._session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))


def resolve_graph(repo_or_dir: str | os.PathLike[str], variant: str, **download: Any) -> tuple[Path, EnsembleConfig]:
    """The local path of ``variant``'s graph and the config, from a folder or a Hub repo (``hf_hub_download``
    arguments in ``download``); the graph's external data is fetched beside it only when the graph refers to it.

    Raises:
        ValueError: an unknown ``variant``.
    """
    graph_name = variant_graph_name(variant)
    config = EnsembleConfig.from_json_file(str(resolve_file(repo_or_dir, CONFIG_NAME, **download)))
    graph = resolve_file(repo_or_dir, graph_name, **download)
    if _refers_to_external_data(graph):
        resolve_file(repo_or_dir, ONNX_DATA_NAME, **download)  # lands beside the graph, where the runtime looks
    return graph, config


def variant_graph_name(variant: str) -> str:
    """The graph file of ``variant`` inside an artifact (``fp32``: ``onnx/model.onnx``, ``int8``: ...).

    Raises:
        ValueError: an unknown variant, naming the known ones.
    """
    if variant not in ONNX_VARIANTS:
        raise ValueError(f"unknown graph variant {variant!r}; expected one of {sorted(ONNX_VARIANTS)}")
    return ONNX_VARIANTS[variant]


def _select_providers(
    available: Sequence[str], providers: Sequence[ProviderSpec] | None, allow_cpu_fallback: bool
) -> tuple[list[ProviderSpec], list[str]]:
    """Providers to ask ONNX Runtime for, and those of them besides CPU the caller explicitly requested."""
    if providers is None:  # nothing requested explicitly: the best this onnxruntime offers
        return [name for name in DEFAULT_PROVIDERS if name in available], []
    if isinstance(providers, str):
        raise TypeError(f"providers must be a list of provider names, got the string {providers!r}")
    names = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [name for name in names if name not in available]
    if missing and not allow_cpu_fallback:
        raise MissingDependencyError(
            f"execution provider(s) {missing} are not available in this onnxruntime (available: {list(available)}); "
            f"{_GPU_HINT}, or pass allow_cpu_fallback=True to run on CPU"
        )
    if missing:
        logger.warning("execution provider(s) %s are not available; falling back to CPU as allowed", missing)
    chosen = [p for p, name in zip(providers, names, strict=True) if name in available]
    if allow_cpu_fallback and "CPUExecutionProvider" not in names:
        chosen.append("CPUExecutionProvider")
    return chosen, [name for name in names if name in available and name != "CPUExecutionProvider"]


def _refers_to_external_data(graph: Path) -> bool:
    """Whether the graph's tensors point into ``model.onnx.data`` (their ``location`` entry, protobuf-encoded)."""
    location = b"model.onnx.data"
    entry = b"\x0a\x08location\x12" + bytes([len(location)]) + location  # StringStringEntryProto(key, value)
    if graph.stat().st_size == 0:
        return False
    with open(graph, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(entry) != -1
