"""`freetickets train` end to end on a tiny synthetic dataset: Hub-ready folder, summary, reload."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from freetickets_hub.cli import main
from freetickets_hub.errors import RecipeError
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.training.data import load_image_data
from freetickets_hub.training.recipe import load_recipe
from freetickets_hub.training.sparsity import maskable_weights

from .conftest import SHARED_FMNIST, write_image_dataset

TINY = ["max_train_samples=60", "val_size=24", "batch_size=16", "eval_batch_size=64", "update_interval=2"]


def _train(out: Path, dataset: Path, *overrides: str, tiny: bool = True) -> dict:
    """Train the tiny recipe on ``dataset`` (shrunk further with TINY unless ``tiny`` is False)."""
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(out)]
    for item in (f"dataset={dataset}", *(TINY if tiny else ()), *overrides):
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def edst_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("edst")
    return out, _train(out, tiny_dataset, "explore_epochs=2", "refine_epochs=1")


def test_edst_writes_a_hub_ready_folder(edst_run: tuple[Path, dict]) -> None:
    out, summary = edst_run
    assert {"config.json", "model.safetensors", "README.md", "train_summary.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["ensemble"]["method"] == "edst" and config["ensemble"]["num_members"] == 3
    assert config["pretrained_cfg"]["input_size"] == [1, 12, 12]
    assert config["label_names"] == ["circle", "square", "cross"]
    assert set(summary["test"]) == {"ensemble", "member_0", "member_1", "member_2"}
    for metrics in summary["test"].values():
        assert all(math.isfinite(metrics[k]) for k in ("accuracy", "nll", "ece", "brier"))
    assert [t["phase"] for t in summary["tickets"]] == ["refine 1/3", "refine 2/3", "refine 3/3"]
    assert summary["recipe"]["method"] == "edst" and summary["wall_time_s"] > 0
    assert summary["num_images"] == {"train": 60, "val": 24, "test": 48}


def test_tickets_differ_and_keep_target_sparsity(edst_run: tuple[Path, dict]) -> None:
    out, summary = edst_run
    model = EnsembleModel.from_pretrained(out)
    for index in range(3):
        weights = maskable_weights(model.members[index])
        masks = model.masks[index]
        for name, weight in weights.items():
            if name in masks:
                assert not weight[~masks[name]].any()
        assert summary["sparsity"]["realised"][index] == pytest.approx(0.8, abs=2e-3)
    shared = [n for n in model.masks[0]]
    assert shared
    for a, b in ((0, 1), (1, 2), (0, 2)):
        same = sum(int((model.masks[a][n] & model.masks[b][n]).sum()) for n in shared)
        total = sum(int(model.masks[a][n].sum()) for n in shared)
        assert same < 0.9 * total, f"tickets {a} and {b} share {same / total:.0%} of their masks"


def test_save_load_round_trip_is_bit_identical(edst_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = edst_run
    model = EnsembleModel.from_pretrained(out)
    x = torch.randn(5, 1, 12, 12)
    model.save_pretrained(tmp_path / "again")
    again = EnsembleModel.from_pretrained(tmp_path / "again")
    first, second = model(x), again(x)
    for name in ("logits", "probs", "member_probs", "entropy", "mutual_information", "disagreement"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    for a, b in zip(model.members, again.members, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("method", ["dst", "static_sparse", "dense_ensemble"])
def test_other_methods_train(tmp_path: Path, tiny_dataset: Path, method: str) -> None:
    summary = _train(tmp_path, tiny_dataset, f"method={method}", "num_members=2", "epochs=1")
    assert set(summary["test"]) == {"ensemble", "member_0", "member_1"}
    expected = 0.0 if method == "dense_ensemble" else 0.8
    assert summary["sparsity"]["realised"][0] == pytest.approx(expected, abs=2e-3)


def test_gradient_accumulation_and_bf16(tmp_path: Path, tiny_dataset: Path) -> None:
    plain = _train(tmp_path / "plain", tiny_dataset, "num_members=1", "explore_epochs=1", "refine_epochs=1")
    # accelerate's state is per process: a different mixed precision needs a fresh process
    args = [sys.executable, "-m", "freetickets_hub.cli", "train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml"]
    args += ["--output-dir", str(tmp_path / "accum")]
    for item in (f"dataset={tiny_dataset}", *TINY, "num_members=1", "explore_epochs=1", "refine_epochs=1"):
        args += ["--set", item]
    args += ["--set", "grad_accum_steps=2", "--set", "mixed_precision=bf16"]
    subprocess.run(args, check=True, capture_output=True)
    summary = json.loads((tmp_path / "accum" / "train_summary.json").read_text())
    assert summary["recipe"]["mixed_precision"] == "bf16"
    epochs, batches = 2, plain["total_steps"] // 2  # 3 batches per epoch
    assert summary["total_steps"] == epochs * math.ceil(batches / 2)  # a step per 2 batches, and at epoch end
    assert summary["sparsity"]["realised"][0] == pytest.approx(0.8, abs=2e-3)
    assert math.isfinite(summary["test"]["ensemble"]["nll"])


def test_timm_pipeline_streams_rgb_images_of_mixed_sizes(tmp_path: Path) -> None:
    dataset = write_image_dataset(tmp_path / "rgb", train=48, test=12, rgb_mixed_sizes=True)
    out = tmp_path / "out"
    summary = _train(
        out, dataset, "augment=timm", "image_size=16", "num_members=2", "explore_epochs=1", "refine_epochs=1"
    )
    assert summary["num_images"] == {"train": 24, "val": 24, "test": 12}
    config = json.loads((out / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["crop_pct"] == 0.875
    assert config["model_args"]["in_chans"] == 3
    model = EnsembleModel.from_pretrained(out)
    assert model.predict(np.zeros((30, 20, 3), dtype=np.uint8)).probs.shape == (1, 3)


def test_mixed_sizes_need_the_timm_pipeline(tmp_path: Path) -> None:
    dataset = write_image_dataset(tmp_path / "rgb", train=12, test=6, rgb_mixed_sizes=True)
    with pytest.raises(RecipeError, match="different sizes: use `augment: timm`"):
        load_image_data(load_recipe(None, [f"dataset={dataset}", "val_size=0"]))


def test_report_to_tensorboard_writes_events(tmp_path: Path, tiny_dataset: Path) -> None:
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(tmp_path)]
    for item in (f"dataset={tiny_dataset}", *TINY, "num_members=1", "explore_epochs=1", "refine_epochs=1"):
        args += ["--set", item]
    assert main([*args, "--report-to", "tensorboard"]) == 0
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/density"} <= set(tags)


def test_cli_reports_recipe_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--recipe",
            "training/recipes/fmnist_tiny_edst.yaml",
            "--output-dir",
            str(tmp_path),
            "--set",
            "sparsty=0.9",
        ]
    )
    assert code == 2
    assert "unknown recipe key 'sparsty'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_module_entry_point_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "freetickets_hub.cli", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--recipe" in result.stdout and "--set" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FMNIST.is_dir(), reason="needs ../shared/datasets/fashion_mnist")
def test_tiny_recipe_on_real_fashion_mnist(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    summary = _train(out, SHARED_FMNIST, tiny=False)
    assert summary["test"]["ensemble"]["accuracy"] > 0.6
    model = EnsembleModel.from_pretrained(out)
    assert model.num_members == 3


def test_calibrate_on_the_runs_own_validation_carve(
    edst_run: tuple[Path, dict],
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--split validation`` fits on exactly the rows the run held out (the fit itself is tested elsewhere)."""
    import datasets

    from freetickets_hub.data import validation_carve
    from freetickets_hub.uncertainty import calibration

    seen: list[torch.Tensor] = []
    real_fit = calibration.fit_temperature

    def fit(logits: torch.Tensor, labels: torch.Tensor, **kwargs: object) -> calibration.TemperatureFit:
        seen.append(labels.clone())
        return dataclasses.replace(real_fit(logits, labels, **kwargs), temperature=1.5, degenerate=False)

    monkeypatch.setattr(calibration, "fit_temperature", fit)
    out = tmp_path / "model"
    shutil.copytree(edst_run[0], out)
    assert main(["calibrate", str(out), "--dataset", str(tiny_dataset), "--split", "validation"]) == 0
    assert "the 24 images the run held out of 'train' (seed 0)" in capsys.readouterr().out
    train_split = datasets.load_dataset(str(tiny_dataset), split="train")
    rows = validation_carve(len(train_split), 24, 0).val
    assert seen[0].tolist() == [train_split[int(i)]["label"] for i in rows]
    calibrated = json.loads((out / "config.json").read_text())["ensemble"]["calibration"]
    assert calibrated["temperature"] == 1.5
    assert calibrated["fit_on"] == f"{tiny_dataset.name}:validation (24 images)"  # no machine path


def test_exclude_classes_drops_their_rows_and_renumbers_the_rest(tiny_dataset: Path) -> None:
    full = load_image_data(load_recipe(None, [f"dataset={tiny_dataset}", "val_size=0"]))
    held = load_image_data(load_recipe(None, [f"dataset={tiny_dataset}", "val_size=12", "exclude_classes=[square]"]))
    assert held.label_names == ["circle", "cross"]
    kept_rows = full.test.labels != 1
    assert torch.equal(held.test.images, full.test.images[kept_rows])
    assert torch.equal(held.test.labels, full.test.labels[kept_rows].div(2, rounding_mode="floor"))
    assert set(held.train.labels.tolist()) | set(held.val.labels.tolist()) == {0, 1}
    assert len(held.train) + len(held.val) == int((full.train.labels != 1).sum())


def test_exclude_classes_trains_a_head_without_them(tmp_path: Path, tiny_dataset: Path) -> None:
    _train(tmp_path, tiny_dataset, "exclude_classes=[cross]", "num_members=1", "explore_epochs=1", "refine_epochs=1")
    model = EnsembleModel.from_pretrained(tmp_path)
    assert model.config.label_names == ["circle", "square"]
    assert model.members[0].get_classifier().out_features == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[hexagon]", r"\['hexagon'\] are not classes"),
        ("[circle, square]", "leaves 1 class"),
        ("[cross, cross]", "twice"),
    ],
)
def test_exclude_classes_refuses_what_it_cannot_hold_out(tiny_dataset: Path, value: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_image_data(load_recipe(None, [f"dataset={tiny_dataset}", "val_size=0", f"exclude_classes={value}"]))
