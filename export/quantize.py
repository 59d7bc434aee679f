"""The int8 ensemble graph: static QDQ quantization with ONNX Runtime, kept only if it passes a quality gate.

Weights are quantized per output channel (int8, symmetric) and activations per tensor (uint8) with
ranges calibrated on real images. Two parts stay float32: each member's first convolution, which reads
the pixels (on the Fashion-MNIST demo quantizing it alone cut top-1 agreement with float32 from 99.5 %
to 91 %, for well under 1 % of the FLOPs), and the tail that turns member logits into probabilities and
uncertainty (softmax, mean, log, entropies, disagreement). Before the graph is kept
it runs beside the float32 graph on held-out labelled images: top-1 agreement must reach
``MIN_AGREEMENT`` and accuracy may drop at most ``MAX_ACCURACY_DROP``; NLL and ECE are reported.

A stored selective rule (``ensemble.selective``, fitted on the float32 outputs) is applied to the int8
outputs unchanged; the report says on how many held-out images its decisions differ from float32's,
and what coverage and risk it has there with each graph.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.names import METADATA_NUM_MEMBERS, METADATA_TEMPERATURE, ONNX_INT8_NAME
from freetickets_hub.data import EvalSplit
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.errors import ExportError
from freetickets_hub.uncertainty.metrics import classification_metrics
from freetickets_hub.uncertainty.selective import decide, evaluate_rule

from .verify import check_interface

__all__ = [
    "MAX_ACCURACY_DROP",
    "MIN_AGREEMENT",
    "MIN_HELD_OUT",
    "ONNX_INT8_NAME",
    "Int8Calibration",
    "QuantizeReport",
    "calibration_from_split",
    "quantize_graph",
    "stem_nodes",
    "tail_nodes",
    "write_int8_graph",
]

MIN_AGREEMENT = 0.99  # share of held-out images whose int8 top-1 equals the float32 graph's
MAX_ACCURACY_DROP = 0.005  # accuracy (a fraction) the int8 graph may lose against the float32 graph
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")  # the members' layers; the aggregation tail has none
# what is quantized inside the members; BatchNormalization (left unfolded before a conv in
# pre-activation nets) stays float32 between a DequantizeLinear and the next QuantizeLinear
_QUANTIZED_OPS = [*_WEIGHT_OPS, "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool"]
MIN_HELD_OUT = 200  # fewer held-out images make a 99 % agreement gate meaningless (one image = 0.5 %)
_BATCH = 8  # calibration images per run: ORT keeps every activation of the batch alive (4x ResNet-50 at 32: 17 GB)


@dataclass
class Int8Calibration:
    """Images for quantizing: calibration images and disjoint labelled held-out images for the gate.

    Args:
        calibration: ``(N, C, H, W)`` preprocessed float32 pixels the activation ranges are fitted on.
        held_out: ``(N, C, H, W)`` preprocessed float32 pixels the int8 graph is checked on.
        labels: ``(N,)`` class indices of ``held_out``.
        source: where the images come from, for the report (e.g. ``fashion_mnist:validation``).
    """

    calibration: np.ndarray
    held_out: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        for name in ("calibration", "held_out"):
            pixels = getattr(self, name)
            if not isinstance(pixels, np.ndarray) or pixels.ndim != 4 or len(pixels) == 0:
                raise ValueError(f"Int8Calibration.{name} must be a non-empty (N, C, H, W) array")
        if self.labels.shape != (len(self.held_out),):
            raise ValueError(f"Int8Calibration.labels must have shape ({len(self.held_out)},), got {self.labels.shape}")
        if len(self.held_out) < MIN_HELD_OUT:
            raise ValueError(
                f"the int8 quality gate needs at least {MIN_HELD_OUT} held-out images, got {len(self.held_out)}"
            )


@dataclass
class QuantizeReport:
    """How the int8 graph compares with the float32 graph on the held-out images (in ``export_report.json``)."""

    graph: str
    graph_bytes: int
    calibration_images: int
    held_out_images: int
    source: str
    agreement: float  # top-1 agreement with the float32 graph
    min_agreement: float
    max_accuracy_drop: float
    fp32: dict[str, float]  # accuracy, nll, brier, ece of the float32 graph
    int8: dict[str, float]
    max_abs_diff_probs: float
    fp32_nodes: int  # nodes left in float32 (the members' first convolutions, the aggregation and uncertainty tail)
    # the stored selective rule on both graphs' held-out outputs (None without one): ``fp32`` / ``int8``
    # as ``evaluate_rule`` gives them, ``abstain_agreement`` / ``set_agreement``: share of identical decisions
    selective: dict[str, Any] | None = None


def calibration_from_split(
    split: EvalSplit, config: EnsembleConfig, calibration_samples: int, held_out_samples: int | None = None
) -> Int8Calibration:
    """The first ``calibration_samples`` images of ``split`` calibrate; the next are held out for the gate.

    Args:
        split: labelled images.
        config: the ensemble's config (mean and std).
        calibration_samples: images the activation ranges are fitted on.
        held_out_samples: exactly this many gate images (refused when the split has fewer left), or
            None for every image left.

    Raises:
        ValueError: too few images for both, or an unlabelled split.
    """
    if split.labels is None:
        raise ValueError(f"{split.source}:{split.split} has no labels; the int8 quality gate needs them")
    if calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    if held_out_samples is not None and held_out_samples < MIN_HELD_OUT:
        raise ValueError(f"--held-out-samples must be at least {MIN_HELD_OUT}, got {held_out_samples}")
    left = len(split.images) - calibration_samples
    has = f"{split.source}:{split.split} has {len(split.images)} images: {calibration_samples} to calibrate leave"
    if left < MIN_HELD_OUT:
        raise ValueError(f"{has} {max(left, 0)} for the quality gate, which needs {MIN_HELD_OUT}")
    if held_out_samples is not None and held_out_samples > left:
        raise ValueError(
            f"{has} {left} for the quality gate, fewer than --held-out-samples {held_out_samples}: "
            f"pass --held-out-samples {left} (or fewer calibration samples)"
        )
    held_out = left if held_out_samples is None else held_out_samples
    cfg = config.pretrained_cfg
    channels = split.images.shape[1]
    mean = np.asarray(cfg.get("mean", (0.0,) * channels), np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(cfg.get("std", (1.0,) * channels), np.float32).reshape(1, -1, 1, 1)
    pixels = ((split.images.numpy().astype(np.float32) / 255.0 - mean) / std).astype(np.float32)  # as evaluate does
    return Int8Calibration(
        calibration=pixels[:calibration_samples],
        held_out=pixels[calibration_samples : calibration_samples + held_out],
        labels=split.labels.numpy()[calibration_samples : calibration_samples + held_out],
        source=f"{split.source}:{split.split}",
    )


class _Batches(CalibrationDataReader):
    def __init__(self, pixels: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(pixels, max(1, -(-len(pixels) // _BATCH))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": np.ascontiguousarray(batch, dtype=np.float32)}


def stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the first Conv/Gemm/MatMul on the input pixels' path: each member's first layer.

    The path follows each node's data input (its first) through the ops before a layer, such as a
    packed graph's Tile that repeats the pixels per member (``export.packed``), and ends at the layer.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.input:
            consumers.setdefault(node.input[0], []).append(node)
    stems, seen = set(), set()
    stack = [value.name for value in model.graph.input]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in _WEIGHT_OPS:
                stems.add(node.name)
            else:
                stack.extend(node.output)
    return [node.name for node in model.graph.node if node.name in stems]


def tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes downstream of the members: neither a Conv/Gemm/MatMul nor feeding one."""
    producer = {output: node for node in model.graph.node for output in node.output}
    body: set[str] = set()
    stack = [node for node in model.graph.node if node.op_type in _WEIGHT_OPS]
    while stack:
        node = stack.pop()
        if node.name in body:
            continue
        body.add(node.name)
        stack.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in model.graph.node if node.name not in body]


def quantize_graph(
    source: Path, destination: Path, fp32_graph: Path, config: EnsembleConfig, data: Int8Calibration
) -> QuantizeReport:
    """Quantize the float32 graph ``source`` to ``destination`` and check it against ``fp32_graph``.

    Args:
        source: the dense float32 ensemble graph.
        destination: where the int8 graph goes (removed again when it fails the gate).
        fp32_graph: the float32 graph the int8 graph is compared with (the exported ``model.onnx``).
        config: the ensemble's config (checked against the graphs' metadata).
        data: calibration and held-out images.

    Raises:
        ExportError: quantization failed or the int8 graph fails the quality gate.
    """
    fp32_nodes = write_int8_graph(source, destination, data.calibration)
    try:
        check_interface(destination)
        report = _compare(destination, fp32_graph, config, data, fp32_nodes)
    except ExportError:
        destination.unlink(missing_ok=True)
        raise
    failures = []
    if report.agreement < MIN_AGREEMENT:
        failures.append(f"top-1 agreement with float32 {report.agreement:.2%} < {MIN_AGREEMENT:.0%}")
    drop = report.fp32["accuracy"] - report.int8["accuracy"]
    if drop > MAX_ACCURACY_DROP:
        failures.append(f"accuracy {report.int8['accuracy']:.2%} is {drop:.2%} below float32's")
    if failures:
        destination.unlink(missing_ok=True)
        raise ExportError(
            f"the int8 graph fails its quality gate on {report.held_out_images} held-out images of {data.source} "
            f"({'; '.join(failures)}; NLL {report.fp32['nll']:.4f} -> {report.int8['nll']:.4f}, "
            f"ECE {report.fp32['ece']:.4f} -> {report.int8['ece']:.4f}); nothing was written"
        )
    return report


def write_int8_graph(source: Path, destination: Path, calibration: np.ndarray) -> int:
    """Statically quantize ``source`` to ``destination`` (QDQ), ranges from ``calibration``; no quality gate.

    ``quantize_graph`` is the checked entry point; this step alone serves benchmarks of untrained nets.

    Returns:
        How many nodes stay float32 (the members' first convolutions and the aggregation and uncertainty tail).

    Raises:
        ExportError: onnxruntime.quantization failed.
    """
    destination = Path(destination)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".quantize-") as work:
        prepared = Path(work) / "prepared.onnx"
        # ORT's basic optimisations fold BatchNorm into Conv, so the int8 Conv covers both
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        for index, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{index}"  # nodes_to_exclude works by name
        excluded = stem_nodes(model) + tail_nodes(model)
        onnx.save(model, str(prepared))
        try:
            quantize_static(
                str(prepared),
                str(destination),
                _Batches(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_QUANTIZED_OPS,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as err:  # onnxruntime.quantization raises bare exceptions of many types
            raise ExportError(f"onnxruntime.quantization could not quantize {source.name}: {err}") from err
    quantized = onnx.load(str(destination))
    metadata = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    del quantized.metadata_props[:]
    for key in (METADATA_TEMPERATURE, METADATA_NUM_MEMBERS):
        quantized.metadata_props.add(key=key, value=metadata[key])
    onnx.save(quantized, str(destination))
    return len(excluded)


def _compare(
    int8_graph: Path, fp32_graph: Path, config: EnsembleConfig, data: Int8Calibration, fp32_nodes: int
) -> QuantizeReport:
    outputs = {}
    for name, path in (("fp32", fp32_graph), ("int8", int8_graph)):
        engine = OnnxEnsemble(path, config, providers=["CPUExecutionProvider"])
        chunks = [engine(batch) for batch in np.array_split(data.held_out, -(-len(data.held_out) // 256))]
        outputs[name] = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
    probs = {name: out["probs"] for name, out in outputs.items()}
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    metrics = {name: classification_metrics(torch.from_numpy(p), labels) for name, p in probs.items()}
    return QuantizeReport(
        graph=ONNX_INT8_NAME,
        graph_bytes=int8_graph.stat().st_size,
        calibration_images=len(data.calibration),
        held_out_images=len(data.held_out),
        source=data.source,
        agreement=float((probs["fp32"].argmax(1) == probs["int8"].argmax(1)).mean()),
        min_agreement=MIN_AGREEMENT,
        max_accuracy_drop=MAX_ACCURACY_DROP,
        fp32=metrics["fp32"],
        int8=metrics["int8"],
        max_abs_diff_probs=float(np.abs(probs["fp32"] - probs["int8"]).max()),
        fp32_nodes=fp32_nodes,
        selective=_selective_on_both(outputs, np.asarray(data.labels), config),
    )


def _selective_on_both(
    outputs: dict[str, dict[str, np.ndarray]], labels: np.ndarray, config: EnsembleConfig
) -> dict[str, Any] | None:
    """The stored rule, fitted on float32 outputs, applied unchanged to both graphs' held-out outputs."""
    rule = config.ensemble.selective
    if rule is None:
        return None
    (abstain32, sets32), (abstain8, sets8) = (decide(outputs[name], rule) for name in ("fp32", "int8"))
    result: dict[str, Any] = {name: evaluate_rule(outputs[name], labels, rule) for name in ("fp32", "int8")}
    if abstain32 is not None:
        result["abstain_agreement"] = float((abstain32 == abstain8).mean())
    if sets32 is not None:
        result["set_agreement"] = float(np.mean([a == b for a, b in zip(sets32, sets8, strict=True)]))
    return result
