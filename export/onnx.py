"""``export_onnx``: write an ensemble as ``onnx/model.onnx`` and keep it only if it matches PyTorch.

The graph is written to a temporary folder beside its destination, checked (``onnx.checker``, its
interface, ONNX Runtime vs PyTorch on several batch sizes), and only then moved into place, so a
failed export leaves the folder as it was. The check's result goes to ``onnx/export_report.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import (
    CONFIG_NAME,
    EXPORT_REPORT_NAME,
    ONNX_DATA_NAME,
    ONNX_INT8_NAME,
    ONNX_NAME,
    README_NAME,
    WEIGHTS_NAME,
)
from freetickets_hub.engines.onnxruntime import OnnxEnsemble, has_onnxruntime
from freetickets_hub.engines.preprocessing import ImageInput
from freetickets_hub.errors import ExportError
from freetickets_hub.model.ensemble import EnsembleModel

from .compact import compact_graph_file
from .graph import DEFAULT_OPSET, check_opset, export_graph
from .quantize import Int8Calibration, quantize_graph
from .verify import GATED_OUTPUTS, check_interface, check_pixels, compare_with_torch

__all__ = ["BATCH_SIZES", "FP16_TOLERANCE", "FP32_TOLERANCE", "ExportReport", "export_onnx"]

FP32_TOLERANCE = 1e-5  # max |ORT - PyTorch| of the gated outputs (probabilities and entropies, nats)
FP16_TOLERANCE = 1e-2  # float16 members against the float32 PyTorch ensemble
BATCH_SIZES = (1, 3, 8)


@dataclass
class ExportReport:
    """What was exported and how closely ONNX Runtime reproduces PyTorch (``onnx/export_report.json``)."""

    graph: str  # path of the graph inside the output folder
    external_data: bool  # weights in onnx/model.onnx.data beside the graph
    opset: int
    fp16: bool
    compact: bool  # sparse weights stored as bit mask + values, folded to dense at session creation
    graph_bytes: int  # size of onnx/model.onnx (+ its .data)
    weights_bytes: int | None  # size of model.safetensors in the output folder, when there
    temperature: float  # the calibration temperature baked into the graph
    num_members: int
    batch_sizes: list[int]  # ORT and PyTorch were compared at each
    check_images: str  # what the comparison ran on
    tolerance: float  # bound on max_abs_diff of every gated output
    gated_outputs: list[str]
    max_abs_diff: dict[str, float]  # per output, over all batch sizes
    versions: dict[str, str]
    int8: dict[str, Any] | None = None  # the int8 graph's quality gate (``QuantizeReport``), when written
    packed: bool = False  # the members as one network of grouped layers (``export.packed``), not M branches

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"


def export_onnx(
    model: EnsembleModel | str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    external_data: bool = False,
    compact: bool = True,
    images: Sequence[ImageInput] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    int8: Int8Calibration | None = None,
    packed: bool = False,
) -> ExportReport:
    """Export ``model`` to ``<output_dir>/onnx/model.onnx``, verify it, and write its report.

    Args:
        model: an ``EnsembleModel``, or a folder / Hub repo id to load one from.
        output_dir: where ``onnx/`` goes (and ``config.json`` when the folder lacks one); default:
            the model's folder when ``model`` is one.
        opset: ONNX opset (18 or newer).
        fp16: float16 members, checked against the float32 PyTorch ensemble with ``FP16_TOLERANCE``.
        external_data: write the weights to ``onnx/model.onnx.data`` even below 1.5 GiB.
        compact: store mostly-zero weights as bit mask + values (see ``export.compact``), so the graph
            is about as large as ``model.safetensors``; ONNX Runtime folds them back once at load.
        images: check images (default: synthetic photo-like scenes).
        batch_sizes: batch sizes ONNX Runtime is compared with PyTorch at.
        int8: also write ``onnx/model.int8.onnx``, statically quantized with these calibration images
            and kept only if it passes the quality gate on the held-out images (``export.quantize``);
            when it fails, nothing is written at all. Without it, a previous ``model.int8.onnx`` is removed.
        packed: run the members as one network of grouped layers (``export.packed``: members at equal
            widths, e.g. ``narrow_dense_ensemble``) instead of M branches; the same inputs, outputs and check.

    Raises:
        ValueError: no ``output_dir`` for an in-memory model or a Hub repo, a bad opset, or int8 with fp16.
        MissingDependencyError: onnxruntime (or onnxruntime-gpu) is not installed.
        ExportError: export failed, the graph is malformed, ONNX Runtime disagrees with PyTorch, the
            int8 graph fails its quality gate, ``output_dir`` holds another ensemble's ``config.json``, or
            ``packed`` for members it cannot group.

    Example:
        >>> report = export_onnx("runs/tiny")  # doctest: +SKIP
        >>> report.max_abs_diff["probs"] <= report.tolerance  # doctest: +SKIP
        True
    """
    check_opset(opset)
    if int8 is not None and fp16:
        raise ValueError("int8 quantization starts from the float32 graph: drop --fp16 to use --quantize int8")
    has_onnxruntime(necessary=True)  # the check runs the graph; onnxruntime or onnxruntime-gpu will do
    import onnxruntime

    if output_dir is None:
        if isinstance(model, EnsembleModel) or not os.path.isdir(model):
            where = "an in-memory model" if isinstance(model, EnsembleModel) else repr(str(model))
            raise ValueError(f"output_dir (--output) is required to export {where}: it is not a local folder")
        output_dir = model
    if not isinstance(model, EnsembleModel):
        model = EnsembleModel.from_pretrained(model)
    output_dir = Path(output_dir)
    write_config = _needs_config(output_dir, model.config)
    pixels = check_pixels(images, model.config.pretrained_cfg, max(batch_sizes))  # bad images fail before export
    source = "synthetic photo-like scenes" if images is None else f"{len(images)} given images"
    destination = output_dir / ONNX_NAME
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".export-"))
    try:
        graph = staging / destination.name
        dense = staging / "dense.onnx" if compact else graph
        export_graph(model, dense, opset=opset, fp16=fp16, external_data=external_data, packed=packed)
        if compact:
            compact_graph_file(dense, graph, external_data=external_data)
        check_interface(graph)
        engine = OnnxEnsemble(graph, model.config, providers=["CPUExecutionProvider"])
        diffs = compare_with_torch(model, engine, pixels, batch_sizes)
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
        failed = {name: diffs[name] for name in GATED_OUTPUTS if not diffs[name] <= tolerance}
        if failed:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch beyond the tolerance {tolerance:g} "
                f"(max |diff| {failed}, batch sizes {list(batch_sizes)}); nothing was written"
            )
        int8_report = None
        if int8 is not None:
            int8_report = quantize_graph(dense, staging / Path(ONNX_INT8_NAME).name, graph, model.config, int8)
        if compact:
            for path in staging.glob("dense.onnx*"):
                path.unlink()
        if write_config:
            write_text_atomic(output_dir / CONFIG_NAME, model.config.to_json())
        has_data = (staging / Path(ONNX_DATA_NAME).name).is_file()
        if int8_report is not None:
            os.replace(staging / Path(ONNX_INT8_NAME).name, output_dir / ONNX_INT8_NAME)
        else:
            (output_dir / ONNX_INT8_NAME).unlink(missing_ok=True)  # derived from the graph being replaced
        _move_into_place(staging, destination, has_data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            destination.parent.rmdir()  # only when empty: the onnx/ folder this failed export created
    report = ExportReport(
        graph=ONNX_NAME,
        external_data=has_data,
        opset=opset,
        fp16=fp16,
        compact=compact,
        graph_bytes=_graph_bytes(destination),
        weights_bytes=_file_bytes(output_dir / WEIGHTS_NAME),
        temperature=model.temperature,
        num_members=model.num_members,
        batch_sizes=list(batch_sizes),
        check_images=source,
        tolerance=tolerance,
        gated_outputs=list(GATED_OUTPUTS),
        max_abs_diff=diffs,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        int8=None if int8_report is None else asdict(int8_report),
        packed=packed,
    )
    write_text_atomic(output_dir / EXPORT_REPORT_NAME, report.to_json())
    if (output_dir / README_NAME).is_file():  # a saved model's folder: its card lists the graphs
        write_text_atomic(output_dir / README_NAME, str(model.generate_model_card(save_directory=output_dir)))
    return report


def _file_bytes(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _graph_bytes(graph: Path) -> int:
    data = graph.parent / Path(ONNX_DATA_NAME).name
    return graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _needs_config(output_dir: Path, config: EnsembleConfig) -> bool:
    """Whether ``config.json`` must be written; refuse a folder holding a different ensemble's config."""
    path = output_dir / CONFIG_NAME
    if not path.is_file():
        return True
    if EnsembleConfig.from_json_file(str(path)).to_dict() != config.to_dict():
        raise ExportError(
            f"{path} describes a different ensemble than the one being exported (e.g. another temperature); "
            "save the model there first or choose another output folder"
        )
    return False


def _move_into_place(staging: Path, destination: Path, has_data: bool) -> None:
    """Data first, then the graph, each by an atomic rename: a reader never sees a graph without its data."""
    data = destination.parent / Path(ONNX_DATA_NAME).name
    if has_data:
        os.replace(staging / data.name, data)
    os.replace(staging / destination.name, destination)
    if not has_data:
        data.unlink(missing_ok=True)  # the previous export's weights, no longer referred to
