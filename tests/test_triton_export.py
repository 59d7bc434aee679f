"""``freetickets export triton``: the model repository, its ``config.pbtxt`` parsed with Triton's own schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import onnxruntime as ort
import pytest
import tritonclient
from google.protobuf import text_format

from freetickets_hub.cli import main

from .serve_support import LABEL_NAMES, exported_model

_ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64"}


def model_config_schema() -> ModuleType:
    """``tritonclient/grpc/model_config_pb2.py`` loaded by path (its package would import grpcio)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema() -> ModuleType:
    return model_config_schema()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory)


def export(model_dir: Path, repo: Path, *flags: str) -> int:
    return main(["export", "triton", str(model_dir), "--output-dir", str(repo), *flags])


def test_config_matches_the_graph_under_tritons_schema(model_dir: Path, tmp_path: Path, schema: ModuleType) -> None:
    assert export(model_dir, tmp_path, "--name", "fmnist", "--max-batch-size", "64", "--instances", "2") == 0
    folder = tmp_path / "fmnist"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (folder / "1" / "model.onnx").read_bytes() == (model_dir / "onnx" / "model.onnx").read_bytes()
    assert (folder / "labels.txt").read_text().splitlines() == LABEL_NAMES
    config = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())  # unknown fields fail

    assert config.name == "fmnist" and config.backend == "onnxruntime" and config.max_batch_size == 64
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 5000
    assert batching.default_queue_policy.max_queue_size == 256
    assert batching.default_queue_policy.timeout_action == schema.ModelQueuePolicy.REJECT
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, schema.ModelInstanceGroup.KIND_GPU)]

    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    (declared,) = config.input
    assert declared.name == graph_input.name == "pixel_values"
    assert schema.DataType.Name(declared.data_type) == _ORT_TYPES[graph_input.type]
    assert isinstance(graph_input.shape[0], str) and list(declared.dims) == graph_input.shape[1:]

    graph_outputs = {o.name: o for o in session.get_outputs()}
    declared_outputs = {o.name: o for o in config.output}
    assert len(declared_outputs) == len(config.output), "duplicate output names"
    # every batch-first output is declared; member_probs (M, B, K) cannot be split by Triton's batcher
    assert set(graph_outputs) - set(declared_outputs) == {"member_probs"}
    for name, out in declared_outputs.items():
        graph = graph_outputs[name]
        assert schema.DataType.Name(out.data_type) == _ORT_TYPES[graph.type], name
        assert isinstance(graph.shape[0], str), f"{name} is not batch-first"
        if len(graph.shape) == 1:  # per-image [B]: Triton wants dims [1] and the model's [] shape as reshape
            assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == [], name
        else:
            assert list(out.dims) == graph.shape[1:] and not out.HasField("reshape"), name
    assert declared_outputs["probs"].label_filename == "labels.txt"
    assert {n for n, o in declared_outputs.items() if o.HasField("reshape")} == {
        "entropy",
        "expected_entropy",
        "mutual_information",
        "disagreement",
    }


def test_cpu_instances_queue_bounds_and_default_name(model_dir: Path, tmp_path: Path, schema: ModuleType) -> None:
    flags = ("--kind", "cpu", "--max-queue", "8", "--max-delay-ms", "2.5")
    assert main(["export", "triton", str(model_dir), "--output", str(tmp_path), *flags]) == 0  # --output alias
    config = text_format.Parse((tmp_path / model_dir.name / "config.pbtxt").read_text(), schema.ModelConfig())
    assert config.name == model_dir.name
    assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert export(model_dir, tmp_path, "--kind", "cpu") == 0  # re-exporting replaces the previous export


def test_the_python_backend_variant(model_dir: Path, tmp_path: Path, schema: ModuleType) -> None:
    """``--backend python``: model.py beside an ONNX-only saved ensemble; no selective rule, no selective outputs."""
    assert export(model_dir, tmp_path, "--name", "py", "--backend", "python", "--kind", "cpu") == 0
    folder = tmp_path / "py"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/config.json",
        "1/model.py",
        "1/onnx/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    assert "class TritonPythonModel" in (folder / "1" / "model.py").read_text()
    assert (folder / "1" / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())
    assert config.backend == "python" and config.dynamic_batching.default_queue_policy.max_queue_size == 256
    assert "abstain" not in {o.name for o in config.output}  # the test model stores no selective rule


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--name", "a/b"), "a Triton model name"),
        (("--max-batch-size", "0"), "--max-batch-size must be a positive integer"),
        (("--instances", "0"), "--instances must be a positive integer"),
    ],
)
def test_bad_arguments(model_dir: Path, tmp_path: Path, capsys, flags: tuple[str, ...], message: str) -> None:
    assert export(model_dir, tmp_path, *flags) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused export wrote something"


def test_unknown_backend(model_dir: Path, tmp_path: Path, capsys) -> None:
    from freetickets_hub.export.triton import export_triton

    with pytest.raises(SystemExit) as exited:  # argparse's choices: one line and exit 2
        export(model_dir, tmp_path, "--backend", "tensorrt")
    assert exited.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--backend must be one of"):
        export_triton(model_dir, tmp_path, backend="tensorrt")
    assert not any(tmp_path.iterdir()), "a refused export wrote something"


def test_missing_graph_and_foreign_folder(model_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    assert export(bare, tmp_path / "repo") == 2
    assert "run `freetickets export onnx" in capsys.readouterr().err
    (tmp_path / "repo" / "taken").mkdir(parents=True)
    (tmp_path / "repo" / "taken" / "notes.txt").write_text("mine")
    assert export(model_dir, tmp_path / "repo", "--name", "taken") == 2
    assert "is not a Triton model folder written before" in capsys.readouterr().err
    assert (tmp_path / "repo" / "taken" / "notes.txt").read_text() == "mine"
