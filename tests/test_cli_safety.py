"""Data safety of every command that writes: a folder never holds two models' files, subsets never
replace a folder's results, unwritable destinations fail before the work, two seeds merge."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from freetickets_hub import EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.training import data as training_data
from freetickets_hub.training.recipe import load_recipe

from .conftest_hub import make_ensemble
from .test_evaluation import LABELS, model_labels, random_images, save_tiny_ensemble, write_dataset

RECIPE = "training/recipes/fmnist_tiny_edst.yaml"
TINY = ["max_train_samples=60", "val_size=24", "batch_size=16", "eval_batch_size=64", "update_interval=2"]


def _train_args(out: Path, dataset: Path, *overrides: str) -> list[str]:
    args = ["train", "--recipe", RECIPE, "--output-dir", str(out)]
    for item in (f"dataset={dataset}", *TINY, "explore_epochs=1", "refine_epochs=1", *overrides):
        args += ["--set", item]
    return args


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_model(tmp_path: Path) -> Path:
    """A folder holding a model with every companion: graph, evaluation, plots, a checkpoint."""
    folder = tmp_path / "old"
    make_ensemble(seed=3).save_pretrained(folder)
    for name in ("onnx/model.onnx", "eval_results.json", "assets/reliability.png", "checkpoints/step_1/x.bin"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"old")
    (folder / "notes.txt").write_text("mine")
    return folder


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the work started although the command had to refuse first")


def test_train_refuses_a_folder_holding_a_model(
    old_model: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(old_model)
    monkeypatch.setattr("freetickets_hub.training.train", _never)
    assert main(_train_args(old_model, tiny_dataset)) == 2
    err = capsys.readouterr().err
    assert f"freetickets train: error: '{old_model}' already holds a model" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(old_model) == before


def test_train_overwrite_leaves_no_file_of_the_old_model(old_model: Path, tiny_dataset: Path) -> None:
    assert main([*_train_args(old_model, tiny_dataset), "--overwrite"]) == 0
    names = set(_snapshot(old_model))
    assert not any(
        n.startswith(("onnx/", "assets/")) or n in ("eval_results.json", "checkpoints/step_1/x.bin") for n in names
    )
    assert (old_model / "notes.txt").read_text() == "mine"  # not a model file: kept
    config = json.loads((old_model / "config.json").read_text())
    assert config["label_names"] == LABELS and config["pretrained_cfg"]["input_size"] == [1, 12, 12]
    EnsembleModel.from_pretrained(old_model)  # config, weights and card of the new run only


def test_resume_does_not_restart_over_a_finished_model(
    old_model: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(old_model / "checkpoints")
    before = _snapshot(old_model)
    monkeypatch.setattr("freetickets_hub.training.train", _never)
    assert main([*_train_args(old_model, tiny_dataset), "--resume"]) == 2
    assert "holds a finished model and no checkpoint" in capsys.readouterr().err
    assert _snapshot(old_model) == before


def test_merge_and_calibrate_refuse_a_folder_holding_a_model(
    old_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for seed in (1, 2):
        runs.append(tmp_path / f"run{seed}")
        make_ensemble(seed=seed, members=1, method="dst").save_pretrained(runs[-1])
    before = _snapshot(old_model)
    assert main(["merge", *map(str, runs), "--output-dir", str(old_model)]) == 2
    assert main(["calibrate", str(runs[0]), "--dataset", "x", "--split", "validation", "--output", str(old_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("already holds a model") == 2
    assert _snapshot(old_model) == before
    assert main(["merge", *map(str, runs), "--output", str(old_model), "--overwrite"]) == 0  # the old spelling
    assert not (old_model / "onnx").exists() and not (old_model / "eval_results.json").exists()
    assert EnsembleModel.from_pretrained(old_model).num_members == 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluated")
    model = save_tiny_ensemble(root / "model")
    images = random_images(40)
    data = write_dataset(root / "data", {"test": (images, model_labels(model, images, flip=0.3))}, LABELS)
    assert main(["evaluate", str(root / "model"), "--dataset", str(data)]) == 0
    return root / "model", data


def test_only_a_full_evaluation_replaces_the_folders_results(evaluated: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = evaluated
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert (results["dataset"], results["split"], results["num_images"], results["max_samples"]) == (
        str(data),
        "test",
        40,
        None,
    )
    assert "40 images" in (model_dir / "README.md").read_text()
    before = _snapshot(model_dir)
    for extra in (["--max-samples", "10"], ["--split", "test[:20]"], ["--no-update-card"]):
        assert main(["evaluate", str(model_dir), "--dataset", str(data), *extra]) == 0
    assert main(["evaluate", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "r")]) == 0
    assert (
        main(
            [
                "evaluate",
                str(model_dir),
                "--dataset",
                str(data),
                "--max-samples",
                "9",
                "--output",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    assert _snapshot(model_dir) == before
    assert json.loads((tmp_path / "r" / "eval_results.json").read_text())["num_images"] == 40
    small = json.loads((tmp_path / "s.json").read_text())
    assert (small["num_images"], small["max_samples"]) == (9, 9)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folders_are_refused_before_the_work(
    evaluated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    monkeypatch.setattr("freetickets_hub.training.train", _never)
    try:
        assert main(_train_args(locked / "out", evaluated[1])) == 2
        assert main(["evaluate", str(evaluated[0]), "--dataset", str(evaluated[1]), "--output-dir", str(locked)]) == 2
    finally:
        locked.chmod(0o755)


def test_unwritable_destinations_fail_before_the_work(
    evaluated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, data = evaluated
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("freetickets_hub.training.train", _never)
    monkeypatch.setattr("freetickets_hub.model.ensemble.EnsembleModel.from_pretrained", _never)
    commands = [
        _train_args(blocker / "out", data),
        ["merge", str(model_dir), str(model_dir), "--output-dir", str(blocker / "m")],
        ["calibrate", str(model_dir), "--dataset", str(data), "--split", "validation", "--output-dir", str(blocker)],
        ["evaluate", str(model_dir), "--dataset", str(data), "--output", str(blocker / "r.json")],
        ["evaluate", str(model_dir), "--dataset", str(data), "--plots", str(blocker / "plots")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(commands)
    assert all("error: cannot" in line and "a-file" in line for line in err), err


def test_normalisation_does_not_depend_on_the_seed(tiny_dataset: Path) -> None:
    stats = []
    for seed in (0, 1):
        recipe = load_recipe(RECIPE, [f"dataset={tiny_dataset}", f"seed={seed}", "val_size=24", "max_train_samples=60"])
        data = training_data.load_image_data(recipe)
        stats.append((data.mean, data.std))
    assert stats[0] == stats[1]


def test_two_seeds_of_one_recipe_merge_and_a_run_merges_only_once(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [tmp_path / f"seed{seed}" for seed in (0, 1)]
    for seed, run in enumerate(runs):
        assert main(_train_args(run, tiny_dataset, "method=dst", "num_members=1", "epochs=1", f"seed={seed}")) == 0
    assert main(["merge", *map(str, runs), "--output-dir", str(tmp_path / "dst")]) == 0
    merged = EnsembleModel.from_pretrained(tmp_path / "dst")
    assert merged.num_members == 2 and merged.config.ensemble.method == "dst"
    assert main(["merge", str(runs[0]), str(runs[0]), "--output-dir", str(tmp_path / "twice")]) == 2
    assert f"member 0 of {runs[0]} has exactly the weights of member 0 of {runs[0]}" in capsys.readouterr().err
