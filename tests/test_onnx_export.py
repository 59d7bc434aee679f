"""ONNX export of a whole ensemble: one graph, DESIGN.md outputs, dynamic batch, agreement with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.errors import ExportError
from freetickets_hub.export import export_onnx
from freetickets_hub.export import onnx as export_module
from freetickets_hub.export.verify import check_interface, synthetic_images
from freetickets_hub.training.random_ensemble import random_sparse_ensemble
from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES, combine_member_logits

TEMPERATURE = 1.7


def make_ensemble(seed: int = 0) -> EnsembleModel:
    """The Fashion-MNIST recipe's model (WRN-10-2, 1x28x28, M=3) with random 80 % ERK masks.

    The classifiers are scaled so members are confident and disagree, as trained ones do
    (at initialisation every probability is close to 1/K, which would hide errors).
    """
    config = EnsembleConfig(
        "cifar_wrn10_2",
        10,
        model_args={"in_chans": 1},
        pretrained_cfg={
            "input_size": [1, 28, 28],
            "mean": [0.5],
            "std": [0.5],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
        ensemble={"num_members": 3, "sparsity": 0.8},
    )
    return random_sparse_ensemble(config, seed=seed, logit_spread=3.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleModel, Path]:
    """A calibrated ensemble saved to a folder and exported there through the CLI."""
    folder = tmp_path_factory.mktemp("ensemble")
    model = make_ensemble()
    model.set_temperature(TEMPERATURE, fit_on="test")
    model.save_pretrained(folder)
    assert main(["export", "onnx", str(folder)]) == 0
    return model, folder


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_export_writes_one_graph_with_the_design_interface(exported: tuple[EnsembleModel, Path]) -> None:
    _, folder = exported
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["export_report.json", "model.onnx"]
    graph = onnx.load(str(folder / "onnx" / "model.onnx")).graph
    assert [value.name for value in graph.input] == ["pixel_values"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # the batch axis is dynamic
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert tuple(value.name for value in graph.output) == OUTPUT_NAMES
    report = json.loads((folder / "onnx" / "export_report.json").read_text())
    assert report["batch_sizes"] == [1, 3, 8] and report["opset"] == 20 and report["tolerance"] == 1e-5
    assert report["temperature"] == TEMPERATURE and report["external_data"] is False
    assert max(report["max_abs_diff"][name] for name in report["gated_outputs"]) <= 1e-5


def test_the_graph_holds_no_path_of_the_exporting_machine(exported: tuple[EnsembleModel, Path]) -> None:
    _, folder = exported
    checkout = str(Path(__file__).resolve().parents[1])
    blob = (folder / "onnx" / "model.onnx").read_bytes()
    assert checkout.encode() not in blob and b"site-packages" not in blob  # torch.onnx's per-node stack traces
    graph = onnx.load(str(folder / "onnx" / "model.onnx")).graph
    assert any(p.key == "namespace" for node in graph.node for p in node.metadata_props)  # module scopes stay


@pytest.mark.parametrize("batch_size", [1, 5])
def test_graph_agrees_with_torch_on_every_output(exported: tuple[EnsembleModel, Path], batch_size: int) -> None:
    model, folder = exported
    pixels = preprocess(
        synthetic_images(model.config.pretrained_cfg, batch_size, seed=batch_size), model.config.pretrained_cfg
    )
    outputs = dict(zip(OUTPUT_NAMES, _session(folder).run(None, {"pixel_values": pixels}), strict=True))
    with torch.inference_mode():
        reference = model(torch.from_numpy(pixels))
    for name in OUTPUT_NAMES:
        expected = getattr(reference, name).numpy()
        assert outputs[name].shape == expected.shape, name
        np.testing.assert_allclose(outputs[name], expected, rtol=0, atol=1e-5, err_msg=name)
    assert outputs["member_probs"].shape == (3, batch_size, 10)


def test_temperature_is_applied_identically(exported: tuple[EnsembleModel, Path]) -> None:
    model, folder = exported
    pixels = preprocess(synthetic_images(model.config.pretrained_cfg, 4, seed=7), model.config.pretrained_cfg)
    probs = _session(folder).run(["probs"], {"pixel_values": pixels})[0]
    with torch.inference_mode():
        member_logits = model.member_logits(torch.from_numpy(pixels))
    calibrated = combine_member_logits(member_logits, TEMPERATURE).probs.numpy()
    uncalibrated = combine_member_logits(member_logits, 1.0).probs.numpy()
    np.testing.assert_allclose(probs, calibrated, rtol=0, atol=1e-6)
    assert np.abs(probs - uncalibrated).max() > 1e-3  # the temperature really changes the output


def test_fp16_export_with_external_data(tmp_path: Path) -> None:
    model = make_ensemble(seed=1)
    report = export_onnx(model, tmp_path, fp16=True, external_data=True)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "export_report.json",
        "model.onnx",
        "model.onnx.data",
    ]
    assert report.fp16 and report.external_data and report.tolerance == 1e-2
    assert json.loads((tmp_path / "onnx" / "export_report.json").read_text())["fp16"] is True
    images = synthetic_images(model.config.pretrained_cfg, 6, seed=3)
    engine = OnnxEnsemble.from_pretrained(tmp_path)
    np.testing.assert_allclose(engine.predict(images).probs, model.predict(images).probs, rtol=0, atol=1e-2)


def test_failed_check_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)  # no difference can pass
    with pytest.raises(ExportError, match="disagrees with PyTorch beyond the tolerance"):
        export_onnx(make_ensemble(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_folder_of_another_ensemble_is_refused(tmp_path: Path) -> None:
    model = make_ensemble()
    model.save_pretrained(tmp_path)
    model.set_temperature(2.5, fit_on="test")  # now differs from the saved config.json
    with pytest.raises(ExportError, match="describes a different ensemble"):
        export_onnx(model, tmp_path)
    assert not (tmp_path / "onnx").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset must be between 18"):
        export_onnx(make_ensemble(), tmp_path, opset=12)
    with pytest.raises(ValueError, match=r"output_dir \(--output\) is required"):
        export_onnx(make_ensemble())
    assert main(["export", "onnx", "org/not-a-folder"]) == 2


def _identity_graph(path: Path, batch: int | str, output: str) -> None:
    pixels = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 1, 28, 28])
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 1, 28, 28])
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], [output])], "g", [pixels], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))


def test_interface_check_catches_a_fixed_batch_and_wrong_outputs(tmp_path: Path) -> None:
    _identity_graph(tmp_path / "fixed.onnx", 2, "probs")
    with pytest.raises(ExportError, match="batch axis of 'pixel_values' is fixed to 2"):
        check_interface(tmp_path / "fixed.onnx")
    _identity_graph(tmp_path / "names.onnx", "batch", "probs")
    with pytest.raises(ExportError, match="expected the outputs"):
        check_interface(tmp_path / "names.onnx")
