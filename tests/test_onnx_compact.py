"""Compact ONNX graphs: masked weights stored as bit mask + values, folded back once by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from freetickets_hub.cli import main
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.export.compact import compact_sparse_initializers
from freetickets_hub.export.verify import synthetic_images

from .test_onnx_export import make_ensemble

_DECODE_OPS = {"BitShift", "BitwiseAnd", "CumSum", "Gather"}  # (the tail has Where nodes of its own)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo-shaped ensemble (WRN-10-2, M=3, S=0.8 ERK) exported compact (default) and dense."""
    compact, dense = tmp_path_factory.mktemp("compact"), tmp_path_factory.mktemp("dense")
    model = make_ensemble()
    for folder in (compact, dense):
        model.save_pretrained(folder)
    assert main(["export", "onnx", str(compact)]) == 0
    assert main(["export", "onnx", str(dense), "--dense-graph"]) == 0
    return compact, dense


def _optimized_ops(graph: Path, tmp_path: Path, level: ort.GraphOptimizationLevel) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_compact_graph_is_as_small_as_the_weights(folders: tuple[Path, Path]) -> None:
    compact, dense = folders
    weights = (compact / "model.safetensors").stat().st_size
    size = (compact / "onnx" / "model.onnx").stat().st_size
    assert size <= 1.5 * weights  # the bound
    assert (dense / "onnx" / "model.onnx").stat().st_size > 3 * weights  # what the dense graph costs
    report = json.loads((compact / "onnx" / "export_report.json").read_text())
    assert report["compact"] is True and report["graph_bytes"] == size and report["weights_bytes"] == weights
    assert json.loads((dense / "onnx" / "export_report.json").read_text())["compact"] is False
    assert sorted(p.name for p in (compact / "onnx").iterdir()) == ["export_report.json", "model.onnx"]
    card = (compact / "README.md").read_text()
    assert "## ONNX graphs" in card and f"{size / weights:.2f}× model.safetensors" in card


def test_compact_and_dense_graphs_compute_identical_outputs(folders: tuple[Path, Path]) -> None:
    cfg = make_ensemble().config.pretrained_cfg
    pixels = preprocess(synthetic_images(cfg, 5, seed=11), cfg)
    runs = [
        ort.InferenceSession(str(f / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": pixels}
        )
        for f in folders
    ]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_onnx_runtime_folds_the_decoding_at_session_creation(folders: tuple[Path, Path], tmp_path: Path) -> None:
    graph = folders[0] / "onnx" / "model.onnx"
    stored = [node.op_type for node in onnx.load(str(graph)).graph.node]
    assert stored.count("CumSum") >= 15  # the masked weights are stored compactly ...
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        ops = _optimized_ops(graph, tmp_path, level)
        assert not _DECODE_OPS & set(ops), level  # ... and nothing of their decoding is left to run per call
        assert "Conv" in ops or "FusedConv" in ops


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_compaction_rebuilds_each_tensor_exactly(dtype: type) -> None:
    rng = np.random.default_rng(0)
    sparse = (rng.standard_normal((16, 8, 3, 3)) * (rng.random((16, 8, 3, 3)) < 0.2)).astype(dtype)
    zeros = np.zeros((40, 30), dtype)
    dense = rng.standard_normal((32, 40)).astype(dtype)  # left as it is
    tiny = np.zeros(10, dtype)  # below MIN_ELEMENTS: left as it is
    tensors = {"sparse": sparse, "zeros": zeros, "dense": dense, "tiny": tiny}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outputs = [helper.make_tensor_value_info(f"{n}_out", elem, list(t.shape)) for n, t in tensors.items()]
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in tensors],
        "g",
        [],
        outputs,
        initializer=[numpy_helper.from_array(t, n) for n, t in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert compact_sparse_initializers(model) == 2
    names = {t.name for t in model.graph.initializer}
    assert {"dense", "tiny"} <= names and not {"sparse", "zeros"} & names
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, result in zip(tensors, session.run(None, {}), strict=True):
        assert result.dtype == dtype
        np.testing.assert_array_equal(result, tensors[name], err_msg=name)


def test_graph_without_sparse_weights_is_unchanged() -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    before = model.SerializeToString()
    assert compact_sparse_initializers(model) == 0
    assert model.SerializeToString() == before
