"""The whole ensemble as one traceable module, written to one ONNX graph by torch's dynamo exporter.

The members run in the ``nn.ModuleList`` loop of ``EnsembleModel.member_logits``: both torch
exporters keep the batch axis dynamic for it, while a ``torch.func.vmap`` ensemble fails (legacy
exporter) or gets its batch size fixed (dynamo), and is no faster. Masked weights are already zero
in the members' weights, so the graph needs no mask operations.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from freetickets_hub.artifact.names import METADATA_NUM_MEMBERS, METADATA_TEMPERATURE
from freetickets_hub.errors import ExportError
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES, combine_member_logits

from .packed import PackedMembers

if TYPE_CHECKING:
    import onnx_ir

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "EnsembleGraph", "check_opset", "export_graph"]

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's lowest; it silently raises lower requests to 18
_STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch.onnx writes
_TRACE_BATCH = 2  # batch sizes 0 and 1 are specialised by torch.export; tracing with 2 keeps the axis dynamic


class EnsembleGraph(nn.Module):
    """``EnsembleModel`` returning the DESIGN.md outputs as a tuple in ``OUTPUT_NAMES`` order.

    The calibration temperature becomes a constant of the graph and the aggregation is
    :func:`~freetickets_hub.uncertainty.outputs.combine_member_logits`, the code the torch engine runs.

    Args:
        model: the ensemble (left unchanged).
        fp16: run the members in float16; ``pixel_values`` and every output stay float32.
        packed: run the members as one network of grouped layers (``export.packed``; equal widths only).

    Raises:
        ExportError: ``packed`` for members it cannot group.
    """

    def __init__(self, model: EnsembleModel, *, fp16: bool = False, packed: bool = False) -> None:
        super().__init__()
        if packed:  # a new network already: halving it leaves ``model`` as it is
            members: nn.Module = PackedMembers(model.members, model.config.pretrained_cfg["input_size"])
            self.members = members.half() if fp16 else members
        else:
            self.members = copy.deepcopy(model).half() if fp16 else model
        self.compute_dtype = torch.float16 if fp16 else torch.float32
        self.temperature = model.temperature

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixel_values.to(self.compute_dtype)
        member_logits = self.members(x) if isinstance(self.members, PackedMembers) else self.members.member_logits(x)
        return combine_member_logits(member_logits, self.temperature).to_tuple()  # member logits (M, B, K)


def check_opset(opset: int) -> None:
    """Raise a ValueError unless ``opset`` is one the exporter and the installed onnx both support."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} (the torch exporter's lowest) and {newest}, got {opset}")


def export_graph(
    model: EnsembleModel,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    external_data: bool = False,
    packed: bool = False,
) -> None:
    """Write ``model`` as one ONNX graph with input ``pixel_values`` (dynamic batch) and ``OUTPUT_NAMES``.

    Args:
        model: the ensemble; its ``pretrained_cfg["input_size"]`` gives ``(C, H, W)``.
        path: the graph file; external weights, if any, go beside it as ``<name>.data``.
        opset: the ONNX opset.
        fp16: members in float16 (input and outputs stay float32).
        external_data: always write the weights to ``<name>.data``; torch does so anyway above 1.5 GiB
            (below protobuf's 2 GiB limit).
        packed: the members as one network of grouped layers (``export.packed``), not M branches.

    Raises:
        ValueError: an unsupported opset or a config without ``input_size``.
        ExportError: the exporter failed, or ``packed`` for members it cannot group.
    """
    check_opset(opset)
    input_size = model.config.pretrained_cfg.get("input_size")
    if not input_size or len(input_size) != 3:
        raise ValueError(f"config.pretrained_cfg['input_size'] must be [C, H, W] to export, got {input_size!r}")
    device = next(model.parameters()).device
    example = torch.randn(_TRACE_BATCH, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()  # an inference graph: BatchNorm uses running statistics, dropout is off
    try:
        program = torch.onnx.export(
            EnsembleGraph(model, fp16=fp16, packed=packed).eval(),
            (example,),
            input_names=["pixel_values"],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    except torch.onnx.OnnxExporterError as err:
        raise ExportError(f"torch.onnx could not export {model.config.architecture!r}: {err}") from err
    finally:
        model.train(was_training)
    _drop_stack_traces(program.model)
    program.model.metadata_props[METADATA_TEMPERATURE] = repr(float(model.temperature))
    program.model.metadata_props[METADATA_NUM_MEMBERS] = str(model.num_members)
    program.save(str(path), external_data=external_data)


def _drop_stack_traces(graph_model: onnx_ir.Model) -> None:
    """Remove the exporter's per-node Python stack traces: they hold the exporting machine's file paths."""
    graphs = [graph_model.graph, *graph_model.functions.values()]
    for node in (node for graph in graphs for node in graph.all_nodes()):
        node.metadata_props.pop(_STACK_TRACE, None)
