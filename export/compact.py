"""Sparse weights stored compactly inside an ONNX graph, folded back to dense once at session creation.

A masked weight is stored as the artifact stores it: the bit-packed mask (``artifact.masks``,
``numpy.packbits`` big-endian) and the values at its set positions. A few constant nodes rebuild the dense tensor::

    bits = (mask[:, None] >> [7..0]) & 1          # BitShift, BitwiseAnd, Reshape, Slice
    dense = Where(bits, Gather(values, CumSum(bits) - 1), 0)

Every input of these nodes is an initializer, so ONNX Runtime's constant folding (on at its default
optimisation level and at ``ORT_ENABLE_BASIC`` and above) evaluates them once when the session is
created and runs the same dense convolutions as the dense graph. ONNX sparse initializers would
also load (ORT densifies them), but their int64 COO indices cost 8 bytes per nonzero on top of the
values, twice the artifact; the 1-bit mask costs what ``model.safetensors`` costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from freetickets_hub.artifact.masks import pack_mask

__all__ = ["MAX_DENSITY", "MIN_ELEMENTS", "compact_graph_file", "compact_sparse_initializers"]

MIN_ELEMENTS = 1024  # smaller tensors (biases, norms) are not worth the nodes
MAX_DENSITY = 0.75  # above this share of nonzeros the mask + values save too little
_EXTERNAL_ABOVE = 3 * 2**29  # 1.5 GiB, torch's threshold below protobuf's 2 GiB limit
_PREFIX = "freetickets.compact"
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}


def compact_sparse_initializers(
    model: onnx.ModelProto, *, min_elements: int = MIN_ELEMENTS, max_density: float = MAX_DENSITY
) -> int:
    """Replace mostly-zero float initializers of ``model`` by mask + values and the nodes that rebuild them.

    The graph is changed in place and computes exactly what it computed before (the rebuilt
    tensors are bit-identical). Initializers with external data must be loaded first.

    Args:
        model: the graph (opset 18 or newer: ``BitwiseAnd``).
        min_elements: leave tensors with fewer elements dense.
        max_density: leave tensors with a larger share of nonzeros dense.

    Returns:
        How many initializers were compacted.
    """
    graph = model.graph
    used_names = {name for node in graph.node for name in node.output} | {t.name for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    kept: list[onnx.TensorProto] = []
    count = 0
    for tensor in graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES or _numel(tensor) < min_elements:
            kept.append(tensor)
            continue
        dense = numpy_helper.to_array(tensor)
        mask = dense.reshape(-1) != 0
        if mask.mean() > max_density:
            kept.append(tensor)
            continue
        count += 1
        stem = f"{_PREFIX}.{count}"
        kept.append(numpy_helper.from_array(pack_mask(mask), f"{stem}.mask"))
        values = dense.reshape(-1)[mask] if mask.any() else np.zeros(1, dense.dtype)  # Gather needs one entry
        kept.append(numpy_helper.from_array(values, f"{stem}.values"))
        kept.append(numpy_helper.from_array(np.array([mask.size], np.int64), f"{stem}.numel"))
        kept.append(numpy_helper.from_array(np.array(dense.shape, np.int64), f"{stem}.shape"))
        kept.append(numpy_helper.from_array(np.zeros((), dense.dtype), f"{stem}.zero"))
        nodes.extend(_rebuild_nodes(stem, tensor.name))
    if not count:
        return 0
    kept.extend(_shared_constants())
    clash = used_names & {t.name for t in kept if t.name.startswith(_PREFIX)}
    assert not clash, f"graph already uses the names {sorted(clash)}"  # internal invariant: our prefix is unused
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # the rebuilt tensors depend on initializers only, so they can come first in topological order
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + original)
    return count


def compact_graph_file(source: str | Path, destination: str | Path, *, external_data: bool = False) -> int:
    """Write the graph at ``source`` to ``destination`` with its sparse initializers compacted.

    Args:
        source: an ONNX graph (its external data, if any, beside it).
        destination: the compact graph; its weights go to ``<name>.data`` beside it with ``external_data``.

    Returns:
        How many initializers were compacted.
    """
    model = onnx.load(str(source))
    count = compact_sparse_initializers(model)
    destination = Path(destination)
    location = destination.name + ".data"
    external_data = external_data or model.ByteSize() > _EXTERNAL_ABOVE
    onnx.save(
        model, str(destination), save_as_external_data=external_data, all_tensors_to_one_file=True, location=location
    )
    return count


def _numel(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def _shared_constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.arange(7, -1, -1, dtype=np.uint8).reshape(1, 8), f"{_PREFIX}.shifts"),
        numpy_helper.from_array(np.array([1], np.uint8), f"{_PREFIX}.bit"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}.flat"),
        numpy_helper.from_array(np.array([0], np.int64), f"{_PREFIX}.start"),
        numpy_helper.from_array(np.array(0, np.int64), f"{_PREFIX}.axis"),
        numpy_helper.from_array(np.array(1, np.int32), f"{_PREFIX}.one"),
        numpy_helper.from_array(np.array(0, np.int32), f"{_PREFIX}.zero_index"),
    ]


def _rebuild_nodes(stem: str, output: str) -> list[onnx.NodeProto]:
    """Nodes computing the dense tensor ``output`` from ``{stem}.mask`` and ``{stem}.values``."""
    p = _PREFIX
    return [
        helper.make_node("Unsqueeze", [f"{stem}.mask", f"{p}.flat"], [f"{stem}.bytes"]),  # (n, 1)
        helper.make_node("BitShift", [f"{stem}.bytes", f"{p}.shifts"], [f"{stem}.shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{stem}.shifted", f"{p}.bit"], [f"{stem}.bits8"]),  # (n, 8) of 0/1
        helper.make_node("Reshape", [f"{stem}.bits8", f"{p}.flat"], [f"{stem}.padded"]),
        helper.make_node("Slice", [f"{stem}.padded", f"{p}.start", f"{stem}.numel"], [f"{stem}.bits"]),
        helper.make_node("Cast", [f"{stem}.bits"], [f"{stem}.ones"], to=TensorProto.INT32),
        helper.make_node("CumSum", [f"{stem}.ones", f"{p}.axis"], [f"{stem}.rank"]),
        # position of each element's value among the nonzeros (clamped to 0 where the mask is unset)
        helper.make_node("Sub", [f"{stem}.rank", f"{p}.one"], [f"{stem}.index"]),
        helper.make_node("Max", [f"{stem}.index", f"{p}.zero_index"], [f"{stem}.safe_index"]),
        helper.make_node("Gather", [f"{stem}.values", f"{stem}.safe_index"], [f"{stem}.gathered"]),
        helper.make_node("Cast", [f"{stem}.bits"], [f"{stem}.set"], to=TensorProto.BOOL),
        helper.make_node("Where", [f"{stem}.set", f"{stem}.gathered", f"{stem}.zero"], [f"{stem}.flat_dense"]),
        helper.make_node("Reshape", [f"{stem}.flat_dense", f"{stem}.shape"], [output]),
    ]
