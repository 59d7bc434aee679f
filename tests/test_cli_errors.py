"""One clear line for every mistake, and the CLI a new user meets: --version, examples, -v, predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freetickets_hub import EnsembleModel
from freetickets_hub.cli import build_parser, main
from freetickets_hub.data import DATASETS_ENV, resolve_dataset
from freetickets_hub.errors import RecipeError
from freetickets_hub.training.recipe import load_recipe

from .conftest_hub import make_ensemble
from .test_cli_safety import _never, _train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    make_ensemble(seed=1, members=2).save_pretrained(folder)
    return folder


def test_path_like_names_fail_at_once_without_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("freetickets_hub.artifact.hub.hf_hub_download", _never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    for name, reason in (
        ("./nope", "it does not exist"),
        ("demoo", "a Hub repo id has the form org/name"),
        ("runs/demoo", "though 'runs' does"),
        ("weights.bin", "it is a file"),
        ("a/b/c", "it does not exist"),
    ):
        with pytest.raises(FileNotFoundError, match=f"no such model folder: '{name}' .*{reason}"):
            EnsembleModel.from_pretrained(name)


def test_a_repo_id_missing_offline_is_one_line_naming_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["evaluate", "org/absent", "--dataset", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("freetickets evaluate: error: 'org/absent' is not a local folder")
    assert "HF_HUB_OFFLINE=1" in err and str(tmp_path / "cache") in err


def test_every_verb_reports_one_line_and_a_traceback_with_v_after_the_verb(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "demoo")
    commands = [
        ["evaluate", missing, "--dataset", "x"],
        ["calibrate", missing, "--dataset", "x", "--split", "validation", "--output-dir", str(tmp_path / "o")],
        ["export", "onnx", missing],
        ["push", missing, "me/x"],
        ["merge", missing, missing, "--output-dir", str(tmp_path / "m")],
        ["predict", missing, __file__],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "demoo" in err, (argv, err)
        assert main([*argv, "-v"]) == 2
        assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_unknown_architecture_and_label_column_fail_before_training(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("freetickets_hub.training.train", _never)
    monkeypatch.setattr("freetickets_hub.training.data.load_image_data", _never)
    assert main(_train_args(tmp_path / "a", tiny_dataset, "architecture=cifar_wrn10_3")) == 2
    assert "unknown architecture 'cifar_wrn10_3'" in capsys.readouterr().err
    monkeypatch.undo()
    recipe = load_recipe("training/recipes/fmnist_tiny_edst.yaml", [f"dataset={tiny_dataset}", "label_column=lable"])
    from freetickets_hub.training.data import load_image_data

    with pytest.raises(RecipeError, match=r"recipe key 'label_column': dataset .* has no column 'lable'"):
        load_image_data(recipe)


def test_shipped_recipes_find_their_dataset_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dataset: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATASETS_ENV, raising=False)
    shared = REPO.parent / "shared" / "datasets"
    recipes = sorted((REPO / "training" / "recipes").glob("fmnist_*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        dataset = load_recipe(path).dataset
        if shared.is_dir():  # a source checkout beside ../shared: the default
            assert resolve_dataset(dataset) == str(shared / "fashion_mnist"), path
        monkeypatch.setenv(DATASETS_ENV, str(tiny_dataset.parent))
        assert resolve_dataset(dataset) == str(tiny_dataset.parent / "fashion_mnist")
        monkeypatch.delenv(DATASETS_ENV)


def test_calibrate_recognises_the_training_dataset_however_it_is_spelled(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "link-to-data"
    link.symlink_to(tiny_dataset)
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    out = tmp_path / "run"
    assert main(_train_args(out, Path("${" + DATASETS_ENV + "}/link-to-data"))) == 0
    monkeypatch.chdir(tiny_dataset.parent)
    code = main(["calibrate", str(out), "--dataset", tiny_dataset.name, "--split", "validation"])
    assert code in (0, 3), capsys.readouterr().err  # 3: a degenerate fit on a tiny run, reported and not stored
    assert "the 24 images the run held out of 'train'" in capsys.readouterr().out


def test_version_and_an_example_in_every_verbs_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("freetickets 0.")
    parser = build_parser()

    def verbs(p, path=()):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    yield from (
                        verbs(sub, (*path, name))
                        if any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions)
                        else [((*path, name), sub)]
                    )

    found = list(verbs(parser))
    assert len(found) >= 7
    for path, sub in found:
        text = sub.format_help()
        assert "example:\n  freetickets " + " ".join(path) in text, path
        assert "--verbose" in text, path


def test_output_dir_is_the_spelling_everywhere_and_output_still_works(saved: Path, tmp_path: Path) -> None:
    parser = build_parser()
    for argv in (["merge", "a", "b"], ["calibrate", "a", "--dataset", "d", "--split", "s"], ["export", "onnx", "a"]):
        assert parser.parse_args([*argv, "--output-dir", "x"]).output == "x"
        assert parser.parse_args([*argv, "--output", "x"]).output == "x"
    assert parser.parse_args(["evaluate", "a", "--dataset", "d", "--output-dir", "x"]).output_dir == "x"
    for spelling in ("--output-dir", "--output"):
        assert parser.parse_args(["train", "--recipe", "r", spelling, "x"]).output_dir == "x"


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_predict_prints_a_table_or_json_with_top_k(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path, 3)
    assert main(["predict", str(saved), *images, "--top-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["image", "label", "conf", "entropy", "MI", "disagree"] and len(table) == 5
    assert main(["predict", str(saved), *images, "--json", "--top-k", "2", "--backend", "torch"]) == 0
    records = json.loads(capsys.readouterr().out)
    expected = EnsembleModel.from_pretrained(saved).predict(images).to_records(top_k=2)
    assert [r.pop("image") for r in records] == images
    assert records == json.loads(json.dumps(expected))
    assert main(["predict", str(saved), images[0], "--top-k", "11"]) == 2
    assert "--top-k must be from 1 to 10" in capsys.readouterr().err
    assert main(["predict", str(saved), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_evaluate_ood_split(tmp_path: Path) -> None:
    from .test_evaluation import LABELS, random_images, save_tiny_ensemble, write_dataset

    save_tiny_ensemble(tmp_path / "model")
    images = random_images(12)
    labels = [i % 3 for i in range(12)]
    data = write_dataset(tmp_path / "data", {"test": (images, labels)}, LABELS)
    ood = write_dataset(tmp_path / "ood", {"train": (random_images(7, seed=3), [0] * 7)}, LABELS)
    out = tmp_path / "r.json"
    argv = ["evaluate", str(tmp_path / "model"), "--dataset", str(data), "--ood-dataset", str(ood)]
    assert main([*argv, "--ood-split", "train", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["ood"][str(ood)]["num_images"] == 7
    assert main([*argv, "--output", str(out)]) == 2  # its default split, test, does not exist


def test_py_typed_ships_with_the_package() -> None:
    import freetickets_hub

    assert (Path(freetickets_hub.__file__).parent / "py.typed").is_file()
    assert '"freetickets_hub" = ["py.typed"]' in (REPO / "pyproject.toml").read_text()


def test_freetickets_help_stays_torch_free() -> None:
    code = "import sys; from freetickets_hub.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr


def test_recipe_variable_without_a_default_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATASETS_ENV, raising=False)
    monkeypatch.setattr("freetickets_hub.data.sources._checkout_datasets", lambda: None)
    with pytest.raises(RecipeError, match=f"needs {DATASETS_ENV}: set it"):
        resolve_dataset("${FREETICKETS_DATASETS}/fashion_mnist")
    assert resolve_dataset("~/x") == os.path.expanduser("~/x") and resolve_dataset("org/ds") == "org/ds"


def test_errors_a_verb_declares_are_one_line_and_any_other_is_a_traceback(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit codes come from one place, ``cli.main``: a verb only declares which errors are the user's."""
    for argv, expected in (
        (["export", "triton", str(saved), "--output-dir", str(tmp_path / "t"), "--name", "a b"], "--name must be"),
        (["serve", str(saved), "--max-queue", "0"], "--max-queue must be at least 1, got 0"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"freetickets {argv[0]}: error: ") and expected in err, err

    def bug(args: object) -> int:
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr("freetickets_hub.cli.merge.run", bug)
    with pytest.raises(ValueError, match="a bug"):  # not swallowed into an exit code
        main(["merge", str(saved), str(saved), "--output-dir", str(tmp_path / "m")])
