"""``export_triton``: a Triton Inference Server model repository for an exported ensemble graph.

Two backends. ``onnxruntime`` writes ``<repo>/<name>/1/model.onnx`` (the ``freetickets export onnx``
graph, unchanged) for Triton's ONNX Runtime backend. ``python`` writes ``<repo>/<name>/1/model.py``
(``triton_model.py``: the graph through ``OnnxEnsemble``) with ``1/config.json`` and
``1/onnx/model.onnx``, so Triton also answers ``abstain`` and ``prediction_set`` from the stored
selective rule, as ``freetickets serve`` does. Both write ``<repo>/<name>/config.pbtxt`` and
``<repo>/<name>/labels.txt``. The config runs the model with dynamic batching over a bounded
queue that rejects when full (as ``freetickets serve`` does), and declares the graph's tensors as
Triton sees them: batch-first, the batch left out of ``dims``. Per-image outputs of shape ``[B]``
are declared ``dims: [1]`` with ``reshape { shape: [] }`` (Triton forbids empty dims), so Triton
returns them as ``[B, 1]``.
``member_probs`` is ``(M, B, K)``, not batch-first, which Triton's batcher cannot split: it is
left out (Triton serves the outputs the config declares).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.hub import resolve_file
from freetickets_hub.artifact.names import CONFIG_NAME, ONNX_DATA_NAME, ONNX_NAME

__all__ = ["BACKENDS", "LABELS_NAME", "TRITON_CONFIG_NAME", "export_triton"]

TRITON_CONFIG_NAME = "config.pbtxt"
LABELS_NAME = "labels.txt"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
BACKENDS = ("onnxruntime", "python")
_PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_LABELLED_OUTPUT = "probs"  # the classification extension reads label names for this output


def export_triton(
    model: str | os.PathLike[str],
    repository: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_batch_size: int = 32,
    instances: int = 1,
    kind: str = "gpu",
    max_queue: int = 256,
    max_delay_ms: float = 5.0,
    backend: str = "onnxruntime",
) -> Path:
    """Write the model repository entry for ``model``'s ``onnx/model.onnx``; returns the ``config.pbtxt`` path.

    Args:
        model: a saved ensemble folder or Hub repo id, exported with ``freetickets export onnx``.
        repository: the Triton model repository folder (created if missing).
        name: the model's name in the repository (default: the last part of ``model``).
        max_batch_size: Triton's ``max_batch_size``, the largest batch its dynamic batcher forms.
        instances: model instances per device (``instance_group.count``).
        kind: ``gpu`` or ``cpu`` instances.
        max_queue: requests the queue holds before Triton rejects new ones.
        max_delay_ms: longest wait for a batch to fill.
        backend: ``onnxruntime`` (the graph on Triton's ONNX Runtime backend) or ``python`` (the
            ensemble through ``OnnxEnsemble`` on Triton's Python backend, with the selective outputs).

    Raises:
        ValueError: a bad argument, a graph without a batch-first input, or a folder that is not a
            previous export in the way.
        FileNotFoundError: the model has no ``onnx/model.onnx`` (run ``freetickets export onnx``).
    """
    name = name or Path(str(model).rstrip("/\\")).name
    if not _NAME.match(name):
        raise ValueError(f"--name must be letters, digits, '_', '.' or '-' (a Triton model name), got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {list(BACKENDS)}, got {backend!r}")
    for flag, value in (("--max-batch-size", max_batch_size), ("--instances", instances), ("--max-queue", max_queue)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if max_delay_ms < 0:
        raise ValueError(f"--max-delay-ms must be >= 0, got {max_delay_ms}")
    config_path = resolve_file(model, CONFIG_NAME)
    config = EnsembleConfig.from_json_file(str(config_path))
    try:
        graph_path = resolve_file(model, ONNX_NAME)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}: run `freetickets export onnx {model}` first") from err
    graph = onnx.load(str(graph_path), load_external_data=False)
    external = any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in graph.graph.initializer
    )  # the weights live in model.onnx.data beside the graph
    extra = _selective_outputs(config) if backend == "python" else []
    text = _config_text(graph, name, backend, extra, max_batch_size, instances, kind, max_queue, max_delay_ms)
    labels = config.label_names or [str(i) for i in range(config.num_classes)]

    repository = Path(repository)
    target = repository / name
    if target.exists() and not (target / TRITON_CONFIG_NAME).is_file():
        raise ValueError(f"{target} exists and is not a Triton model folder written before; choose another --name")
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".{name}."))
    try:
        # python: the version folder is an ONNX-only saved ensemble that OnnxEnsemble.from_pretrained loads
        graph_dir = staging / "1" / Path(ONNX_NAME).parent if backend == "python" else staging / "1"
        graph_dir.mkdir(parents=True)
        shutil.copyfile(graph_path, graph_dir / "model.onnx")
        if external:
            data = resolve_file(model, ONNX_DATA_NAME)
            shutil.copyfile(data, graph_dir / Path(ONNX_DATA_NAME).name)
        if backend == "python":
            shutil.copyfile(_PYTHON_MODEL, staging / "1" / "model.py")
            shutil.copyfile(config_path, staging / "1" / CONFIG_NAME)
        (staging / TRITON_CONFIG_NAME).write_text(text, encoding="utf-8")
        (staging / LABELS_NAME).write_text("\n".join(labels) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / TRITON_CONFIG_NAME


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A tensor's shape: ints for fixed axes, the symbol (or "?") for dynamic ones."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _tensor(value: onnx.ValueInfoProto, *, labelled: bool = False) -> str | None:
    """One ``input``/``output`` entry, batch axis removed; None when the tensor is not batch-first."""
    dims = _dims(value)
    elem = value.type.tensor_type.elem_type
    if not dims or isinstance(dims[0], int) or not all(isinstance(d, int) for d in dims[1:]) or elem not in _TYPES:
        return None
    fields = [f'name: "{value.name}"', f"data_type: {_TYPES[elem]}"]
    if len(dims) == 1:  # per-image [B]: Triton needs non-empty dims, the model's shape is the empty reshape
        fields += ["dims: [ 1 ]", "reshape: { shape: [ ] }"]
    else:
        fields.append(f"dims: [ {', '.join(str(d) for d in dims[1:])} ]")
    if labelled:
        fields.append(f'label_filename: "{LABELS_NAME}"')
    return "  {\n    " + "\n    ".join(fields) + "\n  }"


def _selective_outputs(config: EnsembleConfig) -> list[str]:
    """``abstain`` ``[B]`` and ``prediction_set`` ``[B, K]`` (bool), for the parts of the rule the config stores."""
    selective = config.ensemble.selective
    if selective is None:
        return []
    entries = []
    if selective.score is not None:
        entries.append('name: "abstain"\n    data_type: TYPE_BOOL\n    dims: [ 1 ]\n    reshape: { shape: [ ] }')
    if selective.conformal_score is not None:
        entries.append(f'name: "prediction_set"\n    data_type: TYPE_BOOL\n    dims: [ {config.num_classes} ]')
    return ["  {\n    " + entry + "\n  }" for entry in entries]


def _config_text(
    graph: onnx.ModelProto,
    name: str,
    backend: str,
    extra_outputs: list[str],
    max_batch_size: int,
    instances: int,
    kind: str,
    max_queue: int,
    max_delay_ms: float,
) -> str:
    inputs = [_tensor(value) for value in graph.graph.input]
    if len(inputs) != 1 or inputs[0] is None:
        raise ValueError(f"the graph must have one batch-first image input, got {[v.name for v in graph.graph.input]}")
    outputs = [_tensor(value, labelled=value.name == _LABELLED_OUTPUT) for value in graph.graph.output]
    declared = [entry for entry in outputs if entry is not None] + extra_outputs
    if not declared:
        raise ValueError("the graph has no batch-first output to declare")
    return (
        f'name: "{name}"\n'
        f'backend: "{backend}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs[0]}\n]\n"
        f"output [\n{(',' + chr(10)).join(declared)}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {round(max_delay_ms * 1000)}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {max_queue}\n"
        "  }\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]\n"
    )
