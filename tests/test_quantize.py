"""``export onnx --quantize int8``: a static QDQ graph, calibrated on held-out images, kept only past its gate.

These fast tests use a random-weight ensemble on synthetic shapes: they check the mechanics (what
is quantized, what stays float32, what the report and card say, what a failed gate leaves behind)
but not int8 quality, which means nothing on an untrained net. The quality check on a trained
Fashion-MNIST ensemble is the slow test at the end (and ``benchmarks/inference.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from freetickets_hub import EnsembleConfig, EnsembleModel, OnnxEnsemble
from freetickets_hub.cli import main
from freetickets_hub.data import load_eval_split, validation_carve
from freetickets_hub.export import export_onnx
from freetickets_hub.export import quantize as quantize_module
from freetickets_hub.export.quantize import MIN_HELD_OUT, Int8Calibration, calibration_from_split
from freetickets_hub.export.verify import synthetic_images
from freetickets_hub.training.sparsity import random_masks

from .conftest import LABELS, SHARED_FMNIST, write_image_dataset
from .test_onnx_export import make_ensemble

VAL_SIZE = 300


@pytest.fixture(scope="module")
def carve_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset with train/test splits only: ``validation`` means the run's own carve of train."""
    return write_image_dataset(tmp_path_factory.mktemp("shapes"), train=400, test=20, size=28)


def _three_class_ensemble() -> EnsembleModel:
    """``make_ensemble``'s WRN-10-2 (M=3, random 80 % ERK masks, confident members) for the three shapes."""
    torch.manual_seed(0)
    config = make_ensemble().config.to_dict()
    config.update(num_classes=len(LABELS), label_names=LABELS)
    model = EnsembleModel(EnsembleConfig.from_dict(config))
    generator = torch.Generator().manual_seed(0)
    for index, member in enumerate(model.members):
        masks = random_masks(member, 0.8, "erk", generator)
        state = {name: t * masks[name] if name in masks else t.clone() for name, t in member.state_dict().items()}
        state["fc.weight"] *= 30.0
        model.load_member(index, state, masks)
    return model


def _saved_model(folder: Path, dataset: Path) -> Path:
    """The random ensemble and a train summary naming the validation carve of ``dataset``."""
    _three_class_ensemble().save_pretrained(folder)
    recipe = {"dataset": str(dataset), "train_split": "train", "val_size": VAL_SIZE, "seed": 0}
    (folder / "train_summary.json").write_text(json.dumps({"recipe": recipe}))
    return folder


@pytest.fixture(scope="module")
def quantized(carve_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """Exported with --quantize int8 through the CLI, the gate opened (a random net's int8 quality is noise)."""
    folder = _saved_model(tmp_path_factory.mktemp("quantized"), carve_dataset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize_module, "MIN_AGREEMENT", 0.0)
        patch.setattr(quantize_module, "MAX_ACCURACY_DROP", 1.0)
        argv = ["export", "onnx", str(folder), "--quantize", "int8", "--calibration-dataset", str(carve_dataset)]
        assert main([*argv, "--calibration-samples", "64"]) == 0  # the gate: every image left (236)
    report = json.loads((folder / "onnx" / "export_report.json").read_text())
    return folder, report, str(carve_dataset)


def test_int8_graph_is_written_beside_the_fp32_graph(quantized: tuple[Path, dict, str]) -> None:
    folder, report, dataset = quantized
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [
        "export_report.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    int8 = report["int8"]
    assert int8["graph"] == "onnx/model.int8.onnx" and int8["graph_bytes"] == (folder / int8["graph"]).stat().st_size
    # --calibration-split validation on data without one: the run's carve, 64 to calibrate, the rest held out
    assert int8["calibration_images"] == 64 and int8["held_out_images"] == VAL_SIZE - 64
    assert int8["source"] == f"{Path(dataset).name}:validation (the run's carve of 'train')"  # no machine path
    assert dataset not in (folder / "onnx" / "export_report.json").read_text()
    assert dataset not in (folder / "README.md").read_text()
    assert set(int8["fp32"]) == set(int8["int8"]) == {"accuracy", "nll", "brier", "ece"}
    card = (folder / "README.md").read_text()
    assert "`onnx/model.onnx` | fp32" in card and "`onnx/model.int8.onnx` | int8 (QDQ)" in card
    assert f"top-1 agreement with fp32 {int8['agreement']:.2%}" in card


def test_report_matches_a_rerun_on_the_same_held_out_images(quantized: tuple[Path, dict, str]) -> None:
    folder, report, dataset = quantized
    fp32 = OnnxEnsemble.from_pretrained(folder)
    int8 = OnnxEnsemble.from_pretrained(folder, variant="int8")
    assert int8.output_names == fp32.output_names
    val_rows = validation_carve(400, VAL_SIZE, 0).val
    split = load_eval_split(dataset, fp32.config, split="train", rows=val_rows.tolist())
    data = calibration_from_split(split, fp32.config, 64)
    a, b = fp32(data.held_out), int8(data.held_out)
    assert report["int8"]["agreement"] == pytest.approx(float((a["probs"].argmax(1) == b["probs"].argmax(1)).mean()))
    accuracy = float((b["probs"].argmax(1) == data.labels).mean())
    assert report["int8"]["int8"]["accuracy"] == pytest.approx(accuracy)
    assert report["int8"]["max_abs_diff_probs"] == pytest.approx(float(np.abs(a["probs"] - b["probs"]).max()))
    for name in ("member_probs", "entropy", "mutual_information", "disagreement"):
        assert b[name].shape == a[name].shape
    np.testing.assert_allclose(b["probs"].sum(1), 1.0, atol=1e-5)


def test_endpoint_handler_serves_the_int8_graph(
    quantized: tuple[Path, dict, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, _ = quantized
    from freetickets_hub.model.endpoint_handler import VARIANT_ENV, EndpointHandler

    image = synthetic_images(make_ensemble().config.pretrained_cfg, 1, seed=2)[0]
    monkeypatch.setenv(VARIANT_ENV, "int8")
    handler = EndpointHandler(str(folder))
    assert isinstance(handler.model, OnnxEnsemble)
    expected = OnnxEnsemble.from_pretrained(folder, variant="int8").predict([image]).probs[0]
    answer = handler({"inputs": image, "parameters": {"top_k": 3}})
    assert [a["label"] for a in answer] == [LABELS[k] for k in expected.argsort()[::-1]]
    assert answer[0]["score"] == pytest.approx(float(expected.max()))


def test_reexport_without_int8_removes_the_stale_int8_graph(quantized: tuple[Path, dict, str], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(quantized[0], folder)
    assert main(["export", "onnx", str(folder)]) == 0
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["export_report.json", "model.onnx"]
    assert "model.int8.onnx" not in (folder / "README.md").read_text()
    pixels = np.zeros((MIN_HELD_OUT, 1, 28, 28), np.float32)
    data = Int8Calibration(pixels[:8], pixels, np.zeros(MIN_HELD_OUT, np.int64), "zeros")
    with pytest.raises(ValueError, match="drop --fp16"):
        export_onnx(folder, fp16=True, int8=data)


def test_members_are_int8_and_the_tail_stays_float32(quantized: tuple[Path, dict, str], tmp_path: Path) -> None:
    folder, report, _ = quantized
    graph = onnx.load(str(folder / "onnx" / "model.int8.onnx"))
    producer = {out: node for node in graph.graph.node for out in node.output}
    inits = {t.name: t for t in graph.graph.initializer}
    convs = [node for node in graph.graph.node if node.op_type == "Conv" and node.input[0] != "pixel_values"]
    assert convs and all(producer[node.input[1]].op_type == "DequantizeLinear" for node in convs)
    stems = [node for node in graph.graph.node if node.op_type == "Conv" and node.input[0] == "pixel_values"]
    assert len(stems) == 3 and all(node.input[1] in inits for node in stems)  # each member's first conv: float32
    scale = inits[producer[convs[-1].input[1]].input[1]]
    assert scale.dims[0] > 1  # one scale per output channel
    for op in ("LogSoftmax", "ReduceLogSumExp", "ArgMax", "Exp"):
        nodes = [node for node in graph.graph.node if node.op_type == op]
        assert nodes, op
        for node in nodes:
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input), op
    assert report["int8"]["fp32_nodes"] > 10
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "onnx" / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") >= len(convs) // 2  # ORT runs the members' convolutions with int8 kernels


def test_failed_gate_writes_nothing(
    carve_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = _saved_model(tmp_path / "m", carve_dataset)
    before = sorted(os.listdir(folder))
    monkeypatch.setattr(quantize_module, "MIN_AGREEMENT", 1.01)  # no graph can pass
    argv = ["export", "onnx", str(folder), "--quantize", "int8", "--calibration-dataset", str(carve_dataset)]
    assert main([*argv, "--calibration-samples", "32"]) == 2
    err = capsys.readouterr().err
    assert "fails its quality gate on 268 held-out images" in err and "NLL" in err and "ECE" in err
    assert sorted(os.listdir(folder)) == before  # neither graph, nor a report, nor a changed card


def test_held_out_samples_are_used_exactly_or_refused_with_the_count(
    carve_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = _saved_model(tmp_path / "m", carve_dataset)
    argv = ["export", "onnx", str(folder), "--quantize", "int8", "--calibration-dataset", str(carve_dataset)]
    assert main([*argv, "--calibration-samples", "64", "--held-out-samples", "1000"]) == 2
    err = capsys.readouterr().err
    assert "64 to calibrate leave 236 for the quality gate, fewer than --held-out-samples 1000" in err
    assert "pass --held-out-samples 236" in err and not (folder / "onnx").exists()
    assert main([*argv, "--calibration-samples", "64", "--held-out-samples", "100"]) == 2
    assert f"--held-out-samples must be at least {MIN_HELD_OUT}, got 100" in capsys.readouterr().err
    monkeypatch.setattr(quantize_module, "MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(quantize_module, "MAX_ACCURACY_DROP", 1.0)
    assert main([*argv, "--calibration-samples", "64", "--held-out-samples", "210"]) == 0
    assert "int8: 64 calibration and 210 held-out images of" in capsys.readouterr().err
    assert json.loads((folder / "onnx" / "export_report.json").read_text())["int8"]["held_out_images"] == 210


def test_the_stored_rule_is_checked_on_the_int8_graph_and_the_card_says_so(
    quantized: tuple[Path, dict, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule fitted on fp32 outputs is applied to int8 unchanged: the export measures what that changes."""
    from freetickets_hub.artifact.config import SelectiveConfig
    from freetickets_hub.uncertainty.selective import decide

    folder = tmp_path / "rule"
    shutil.copytree(quantized[0], folder)
    model = EnsembleModel.from_pretrained(folder)
    fp32 = OnnxEnsemble.from_pretrained(folder)
    val_rows = validation_carve(400, VAL_SIZE, 0).val
    split = load_eval_split(quantized[2], fp32.config, split="train", rows=val_rows.tolist())
    held_out = calibration_from_split(split, fp32.config, 64).held_out
    threshold = float(np.median(fp32(held_out)["probs"].max(1)))  # abstains on about half
    model.config.ensemble.selective = SelectiveConfig(
        n=100, fit_on="shapes:validation (100 images)", score="confidence", threshold=threshold, target_risk=0.5,
        delta=0.1, calibration_coverage=0.5, calibration_risk=0.3, conformal_alpha=0.1, conformal_score="lac",
        conformal_quantile=0.5,
    )  # fmt: skip
    (folder / "config.json").write_text(model.config.to_json())
    monkeypatch.setattr(quantize_module, "MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(quantize_module, "MAX_ACCURACY_DROP", 1.0)
    argv = ["export", "onnx", str(folder), "--quantize", "int8", "--calibration-dataset", quantized[2]]
    assert main([*argv, "--calibration-samples", "64"]) == 0
    rule = json.loads((folder / "onnx" / "export_report.json").read_text())["int8"]["selective"]
    int8 = OnnxEnsemble.from_pretrained(folder, variant="int8")
    abstain = {name: decide(engine(held_out), model.config.ensemble.selective)[0] for name, engine in
               (("fp32", OnnxEnsemble.from_pretrained(folder)), ("int8", int8))}  # fmt: skip
    assert rule["abstain_agreement"] == pytest.approx(float((abstain["fp32"] == abstain["int8"]).mean()))
    assert rule["int8"]["threshold"]["coverage"] == pytest.approx(float((~abstain["int8"]).mean()))
    assert 0 < rule["fp32"]["threshold"]["coverage"] < 1 and 0 <= rule["set_agreement"] <= 1
    card = (folder / "README.md").read_text()
    assert f"decides as on fp32 for {rule['abstain_agreement']:.2%} of them" in card
    assert "the same in PyTorch, ONNX Runtime and `handler.py`" not in card


def test_bad_requests_are_refused(carve_dataset: Path, tmp_path: Path, capsys) -> None:
    folder = _saved_model(tmp_path / "m", carve_dataset)
    base = ["export", "onnx", str(folder), "--quantize", "int8"]
    assert main(base) == 2
    assert "needs --calibration-dataset" in capsys.readouterr().err
    assert main([*base, "--calibration-dataset", str(carve_dataset), "--calibration-split", "test"]) == 2
    assert "looks like a test split" in capsys.readouterr().err
    assert main([*base, "--calibration-dataset", str(carve_dataset), "--calibration-samples", "200"]) == 2
    assert "leave 100 for the quality gate, which needs 200" in capsys.readouterr().err
    assert not (folder / "onnx").exists()
    with pytest.raises(ValueError, match="unknown graph variant 'int4'"):
        OnnxEnsemble.from_pretrained(folder, variant="int4")


@pytest.mark.slow  # trains the demo ensemble (about 5 minutes on 2 cores)
@pytest.mark.skipif(not SHARED_FMNIST.is_dir(), reason="needs ../shared/datasets/fashion_mnist")
def test_int8_quality_on_a_trained_fashion_mnist_ensemble(tmp_path: Path) -> None:
    """The README's int8 command passes its real gate (agreement >= 99 %, accuracy within 0.5 points) on
    the documented model, the demo recipe as shipped, on the run's validation carve of real images.

    (A weaker run, 6,000 images and 3 epochs at about 73 %, measured 98.6 % agreement and is refused:
    the gate, not this test, decides for other models.)
    """
    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "training" / "recipes" / "fmnist_demo_edst.yaml"
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(run)]) == 0
    argv = ["export", "onnx", str(run), "--quantize", "int8", "--calibration-dataset", str(SHARED_FMNIST)]
    assert main(argv) == 0
    int8 = json.loads((run / "onnx" / "export_report.json").read_text())["int8"]
    assert int8["held_out_images"] == 2000 and int8["fp32"]["accuracy"] > 0.85  # the demo measures about 88 %
    assert int8["agreement"] >= 0.99
    assert int8["fp32"]["accuracy"] - int8["int8"]["accuracy"] <= 0.005


def test_serve_runs_the_int8_graph(quantized: tuple[Path, dict, str], tmp_path: Path) -> None:
    from freetickets_hub.errors import FreeTicketsError
    from freetickets_hub.serving.engine import check_backend_files, load_engine

    folder, _, _ = quantized
    engine = load_engine(folder, "onnx", "int8")
    pixels = np.random.default_rng(3).normal(size=(4, 1, 28, 28)).astype(np.float32)
    expected = OnnxEnsemble.from_pretrained(folder, variant="int8")(pixels)
    for name, value in engine(pixels).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    with pytest.raises(FreeTicketsError, match="is a graph of the onnx backend"):
        check_backend_files(folder, "torch", "int8")
    fp32_only = _saved_model(tmp_path / "fp32_only", Path(quantized[2]))
    assert main(["export", "onnx", str(fp32_only)]) == 0
    with pytest.raises(
        FreeTicketsError, match=r"has no onnx/model.int8.onnx: run `freetickets export onnx .* --quantize int8"
    ):
        check_backend_files(fp32_only, "onnx", "int8")
