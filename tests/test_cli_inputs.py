"""What predict accepts (both engines alike), load-time checks, the exported member's card, the
model card's paths and sparsity, and the demo's calibration and OOD report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from freetickets_hub import EnsembleModel
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import load_images
from freetickets_hub.errors import ArtifactError
from freetickets_hub.export import export_onnx
from freetickets_hub.model.member import architecture_import
from freetickets_hub.training import demo

from .conftest_hub import make_ensemble
from .test_cli_safety import _train_args

# ----- item 7: inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleModel, OnnxEnsemble, Path]:
    folder = tmp_path_factory.mktemp("exported") / "model"
    model = make_ensemble(seed=4, members=2)
    model.save_pretrained(folder)
    export_onnx(model, folder)
    return model, OnnxEnsemble.from_pretrained(folder, providers=["CPUExecutionProvider"]), folder


def test_numpy_batches_are_split_and_channels_first_is_refused() -> None:
    rng = np.random.default_rng(0)
    assert len(load_images(rng.integers(0, 255, (5, 28, 28), dtype=np.uint8), 1)) == 5  # (B, H, W)
    assert len(load_images(rng.integers(0, 255, (4, 30, 30, 3), dtype=np.uint8), 1)) == 4  # (B, H, W, C)
    assert len(load_images(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), 1)) == 1  # (H, W, C)
    assert len(load_images(rng.integers(0, 255, (30, 30), dtype=np.uint8), 1)) == 1  # (H, W)
    with pytest.raises(ValueError, match=r"looks channels-first \(C, H, W\); pass \(H, W, C\)"):
        load_images(np.zeros((3, 28, 28), np.uint8), 3)  # for a colour model
    assert len(load_images(np.zeros((3, 28, 28), np.uint8), 1)) == 3  # three gray images for a gray model
    with pytest.raises(ValueError, match=r"looks channels-first \(B, C, H, W\)"):
        load_images(np.zeros((2, 3, 28, 28), np.uint8), 3)
    with pytest.raises(ValueError, match=r"image 0: .* with C in \(1, 2, 3, 4\), got uint8 \(3, 28, 28\)"):
        load_images([np.zeros((3, 28, 28), np.uint8)], 3)


def test_both_engines_take_the_same_images_and_refuse_the_same_pixels(
    exported: tuple[EnsembleModel, OnnxEnsemble, Path],
) -> None:
    model, engine, _ = exported
    batch = np.random.default_rng(1).integers(0, 255, (3, 28, 28), dtype=np.uint8)
    torch_out, onnx_out = model.predict(batch), engine.predict(batch)
    assert len(torch_out) == len(onnx_out) == 3 and torch_out.labels == onnx_out.labels
    for empty in (model.predict([]), engine.predict([])):
        assert len(empty) == 0 and empty.probs.shape == (0, 10) and empty.to_records() == []
    for shape in ((2, 1, 64, 64), (2, 3, 28, 28), (0, 1, 28, 28), (1, 28, 28)):
        with pytest.raises(ValueError) as from_torch:
            model(torch.zeros(shape))
        with pytest.raises(ValueError) as from_onnx:
            engine(np.zeros(shape, np.float32))
        assert str(from_torch.value) == str(from_onnx.value), shape
    with pytest.raises(ValueError, match="contains 1 NaN") as from_torch:
        model(torch.tensor(np.where(np.arange(784) == 3, np.nan, 0.0).reshape(1, 1, 28, 28), dtype=torch.float32))


def test_input_channels_that_contradict_the_weights_fail_at_load(
    exported: tuple[EnsembleModel, OnnxEnsemble, Path], tmp_path: Path
) -> None:
    model, _, _ = exported
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 28, 28]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"input_size \[3, 28, 28\] has 3 channel\(s\), but the weights take 1"):
        EnsembleModel.from_pretrained(tmp_path / "m")


def test_a_zero_byte_graph_is_an_artifact_error(
    exported: tuple[EnsembleModel, OnnxEnsemble, Path], tmp_path: Path
) -> None:
    model, _, _ = exported
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "onnx").mkdir()
    (tmp_path / "m" / "onnx" / "model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"model.onnx is empty \(0 bytes\)"):
        OnnxEnsemble.from_pretrained(tmp_path / "m")


# ----- item 9: an exported member loads in a fresh process, as its card says --------------------------


def test_exported_members_card_snippet_runs_in_a_fresh_process(tmp_path: Path) -> None:
    model = make_ensemble(seed=2, members=1, method="dst")
    folder = model.export_member(0, tmp_path / "member0")
    card = (folder / "README.md").read_text()
    assert "import freetickets_hub.model.architectures" in card and "Unknown model (cifar_wrn10_2)" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    pixels = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    code = snippet + "import numpy, torch\nprint(model(torch.from_numpy(numpy.load('pixels.npy'))).tolist())\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = model.members[0](pixels)
    assert torch.allclose(torch.tensor(json.loads(result.stdout)), expected, atol=1e-5)
    assert architecture_import("resnet18") is None  # timm's own: no import needed, and the card says so


# ----- items 11 and 12: a trained run's card, and the demo ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    from freetickets_hub.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(out, tiny_dataset.resolve())) == 0  # an absolute dataset path
    return out


def test_card_has_no_machine_paths_and_one_sparsity(trained: Path, tiny_dataset: Path) -> None:
    from freetickets_hub.cli import main

    main(["calibrate", str(trained), "--dataset", str(tiny_dataset.resolve()), "--split", "train[:30]"])
    card = (trained / "README.md").read_text()
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["recipe"]["dataset"] == str(tiny_dataset.resolve())  # the recipe as it was given
    assert summary["dataset"] == tiny_dataset.name and str(tiny_dataset.parent) not in summary["test_split_description"]
    assert str(tiny_dataset.parent) not in card and "/tmp" not in card
    assert f"dataset: {tiny_dataset.name}" in card  # the recipe block names the folder only
    table = re.findall(r"^\| (\d) \| [\d,]+ of [\d,]+ \| (0\.\d{4}) \|", card, re.M)
    assert [float(s) for _, s in table] == [round(s, 4) for s in summary["sparsity"]["realised"]]
    assert "density" not in card


def test_demo_calibrates_on_its_carve_and_shows_ood_uncertainty(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["demo", str(trained), "--num-images", "2"])
    config_before = (trained / "config.json").read_text()  # (other tests of the module may have calibrated it)
    demo.main()
    out = capsys.readouterr().out
    assert "Temperature fitted on the run's own validation carve (24 images held out of 'train', seed 0)" in out
    for row in ("member 0", "member 2", "mean member", "ensemble"):
        assert re.search(rf"^{row} +[\d.]+ +[01]\.\d{{4}} +\d\.\d{{4}}", out, re.M), row
    assert re.search(r"calibrated NLL: the ensemble \(\d\.\d{4}\) (beats|does NOT beat) its mean member", out)
    assert len(re.findall(r"^digits \(OOD\) +- ", out, re.M)) == 2 and len(re.findall(r"^fashion ", out, re.M)) == 2
    assert re.search(r"mutual information \(epistemic\) +AUROC 0?\.\d{4}|AUROC 1\.0000", out)
    # the seeded tiny run is confidently wrong on its carve: the fit runs to T's upper bound, is
    # reported and not stored, as `calibrate` does (`calibrate` storing a fit: test_selective_cli)
    assert "degenerate fit, temperature not stored: the NLL keeps falling towards the upper bound" in out
    assert (trained / "config.json").read_text() == config_before
