"""The OOD suite: generated and shifted sets, source names, held-out classes, and `evaluate` with all of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.errors import DatasetError
from freetickets_hub.evaluation import (
    CORRUPTIONS,
    OOD_SCORES,
    UNKNOWN_LABEL,
    CorruptionTransform,
    EvalSplit,
    evaluate,
    load_eval_split,
)
from freetickets_hub.evaluation.ood_suite import (
    SHIFTS,
    SUITE_KINDS,
    SYNTHETIC,
    expand_ood_sources,
    ood_kind,
    parse_shift,
    shifted_images,
    shifted_split,
    split_held_out,
    synthetic_images,
    synthetic_split,
)
from freetickets_hub.uncertainty.metrics import detection_metrics

from .conftest import LABELS
from .test_evaluation import random_images, save_tiny_ensemble, write_dataset
from .test_train_cli import TINY

SHAPE = (1, 12, 12)


def _images(count: int = 6, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8))


# ----- generated far-OOD sets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_images_are_seeded_uint8_at_the_shape(name: str) -> None:
    images = synthetic_images(name, 20, (3, 8, 10), seed=1)
    assert images.shape == (20, 3, 8, 10) and images.dtype == torch.uint8
    assert torch.equal(images, synthetic_images(name, 20, (3, 8, 10), seed=1))
    assert not torch.equal(images, synthetic_images(name, 20, (3, 8, 10), seed=2))
    assert len({tuple(image.flatten().tolist()) for image in images}) >= 15  # drawn per image (levels may repeat)


def test_synthetic_images_follow_their_distributions() -> None:
    gaussian = synthetic_images("gaussian", 200, SHAPE).double() / 255
    assert gaussian.mean().item() == pytest.approx(0.5, abs=0.01)
    assert gaussian.std().item() == pytest.approx(0.24, abs=0.005)  # sigma 0.25, clipped at +-2 sigma
    assert gaussian.min() == 0 and gaussian.max() == 1  # rounded and clipped, not wrapped
    uniform = synthetic_images("uniform", 200, SHAPE).double()
    assert uniform.mean().item() == pytest.approx(127.5, abs=2) and uniform.min() == 0 and uniform.max() == 255
    constant = synthetic_images("constant", 200, SHAPE)
    flat = constant.flatten(1)
    assert torch.equal(flat, flat[:, :1].expand_as(flat))  # one level per image
    assert len(flat[:, 0].unique()) > 100  # levels drawn per image over 0..255


def test_synthetic_sets_differ_by_name_and_refuse_unknown_names() -> None:
    assert not torch.equal(synthetic_images("uniform", 4, SHAPE), synthetic_images("constant", 4, SHAPE))
    with pytest.raises(ValueError, match=r"unknown synthetic set 'pink'.*'gaussian', 'uniform', 'constant'"):
        synthetic_images("pink", 4, SHAPE)
    with pytest.raises(ValueError, match="at least 1 image"):
        synthetic_images("uniform", 0, SHAPE)


# ----- shifted copies of the test images -------------------------------------------------------------


def test_invert_and_rot90_are_exact() -> None:
    images = _images()
    inverted = shifted_images("invert", images)
    assert inverted.dtype == torch.uint8 and torch.equal(inverted.int(), 255 - images.int())
    rotated = shifted_images("rot90", images)
    assert rotated.shape == images.shape
    for image, turned in zip(images, rotated, strict=True):
        assert torch.equal(turned[0], torch.from_numpy(np.rot90(image[0].numpy()).copy()))  # counter-clockwise
    four = images
    for _ in range(4):
        four = shifted_images("rot90", four)
    assert torch.equal(four, images) and not torch.equal(rotated, images)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corruption_shift_is_the_corruption_transform_per_index(name: str) -> None:
    images = _images(4, (3, 12, 12))
    shifted = shifted_images(name, images, seed=7)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    for index, image in enumerate(images):
        assert torch.equal(shifted[index], CorruptionTransform(name, 5, 7)(image, index))
    assert not torch.equal(shifted, images)
    three = shifted_images(name, images, seed=7, severity=3)
    assert torch.equal(three[1], CorruptionTransform(name, 3, 7)(images[1], 1))


def test_shifts_refuse_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"unknown shift 'fog'.*'invert', 'rot90', 'brightness'"):
        shifted_images("fog", _images())
    with pytest.raises(ValueError, match="needs square images, got 12x10"):
        shifted_images("rot90", _images(2, (1, 12, 10)))
    with pytest.raises(ValueError, match="expected uint8 images"):
        shifted_images("invert", _images().float())
    with pytest.raises(ValueError, match="'invert' has no severity"):
        shifted_images("invert", _images(), severity=3)
    with pytest.raises(ValueError, match="severity must be one of"):
        shifted_images("contrast", _images(), severity=6)


# ----- source names ----------------------------------------------------------------------------------


def test_names_and_kinds() -> None:
    assert SHIFTS[:2] == ("invert", "rot90") and set(SHIFTS[2:]) == set(CORRUPTIONS) and len(SHIFTS) == 11
    assert {"far", "shifted", "near"} == SUITE_KINDS
    kinds = {n: ood_kind(n) for n in ("sklearn:digits", "synthetic:uniform", "shift:rot90", "held-out", "me/mnist")}
    assert kinds == {
        "sklearn:digits": "far",
        "synthetic:uniform": "far",
        "shift:rot90": "shifted",
        "held-out": "near",
        "me/mnist": "far",
    }
    assert parse_shift("shift:contrast") == ("contrast", 5) and parse_shift("shift:contrast@2") == ("contrast", 2)


def test_suite_expands_to_every_set_once() -> None:
    plain = expand_ood_sources(["suite"], has_unknown_classes=False)
    assert plain == [
        "sklearn:digits",
        *(f"synthetic:{s}" for s in SYNTHETIC),
        *(f"shift:{s}" for s in SHIFTS),
    ]
    with_held_out = expand_ood_sources(["shift:invert", "suite", "me/mnist"], has_unknown_classes=True)
    assert with_held_out[0] == "shift:invert" and with_held_out.count("shift:invert") == 1
    assert with_held_out[-2:] == ["held-out", "me/mnist"] and len(with_held_out) == len(plain) + 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("synthetic:pink", r"synthetic sets are \['synthetic:gaussian'"),
        ("shift:fog", r"shifts are \['shift:invert', 'shift:rot90'"),
        ("shift:invert@3", "only corruptions take a severity"),
        ("shift:contrast@9", r"severity must be one of \(1, 2, 3, 4, 5\), got '9'"),
        ("shift:contrast@", "severity must be one of"),
    ],
)
def test_bad_source_names_say_what_is_allowed(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_ood_sources([name], has_unknown_classes=False)


def test_splits_built_from_the_evaluation_split() -> None:
    data = EvalSplit("fmnist", "test", _images(5), torch.tensor([0, 1, 2, 0, 1]))
    noise = synthetic_split("synthetic:gaussian", data, seed=2)
    assert noise.source == "synthetic:gaussian" and noise.labels is None
    assert torch.equal(noise.images, synthetic_images("gaussian", 5, SHAPE, seed=2))
    blur = shifted_split("shift:defocus_blur@2", data, seed=2)
    assert blur.source == "shift:defocus_blur@2" and blur.split == "test"
    assert torch.equal(blur.images, shifted_images("defocus_blur", data.images, seed=2, severity=2))


def test_split_held_out_separates_unknown_classes() -> None:
    labels = torch.tensor([0, UNKNOWN_LABEL, 1, UNKNOWN_LABEL, 0])
    data = EvalSplit("fmnist", "test", _images(5), labels, ("Shirt", "Sneaker"))
    inside, held_out = split_held_out(data)
    assert inside.labels.tolist() == [0, 1, 0] and torch.equal(inside.images, data.images[[0, 2, 4]])
    assert held_out.source == "held-out" and held_out.labels is None
    assert torch.equal(held_out.images, data.images[[1, 3]]) and held_out.unknown_classes == ("Shirt", "Sneaker")
    with pytest.raises(DatasetError, match="needs an evaluation dataset with classes the model was not trained on"):
        split_held_out(EvalSplit("fmnist", "test", _images(2), torch.tensor([0, 1])))
    with pytest.raises(DatasetError, match=r"no images of the classes \['Shirt', 'Sneaker'\]"):
        split_held_out(EvalSplit("fmnist", "test", _images(2), torch.tensor([0, 1]), ("Shirt", "Sneaker")))


def test_load_eval_split_keeps_unknown_classes_only_when_asked(tmp_path) -> None:
    config = EnsembleConfig(
        "cifar_wrn10_2", 2, model_args={"in_chans": 1}, label_names=["cross", "circle"],
        pretrained_cfg={"input_size": list(SHAPE)},
    )  # fmt: skip
    names = ["circle", "square", "cross", "star"]
    data = write_dataset(tmp_path / "four", {"test": (random_images(8), [0, 1, 2, 3, 3, 2, 1, 0])}, names)
    with pytest.raises(DatasetError, match=r"has \['square', 'star'\] that the model does not know.*held-out"):
        load_eval_split(str(data), config)
    split = load_eval_split(str(data), config, keep_unknown_classes=True)
    assert split.labels.tolist() == [1, -1, 0, -1, -1, 0, -1, 1] and split.unknown_classes == ("square", "star")
    assert load_eval_split(str(data), config, keep_unknown_classes=True, max_samples=3).labels.shape == (3,)
    lacking = write_dataset(tmp_path / "lacking", {"test": (random_images(2), [0, 1])}, ["circle", "star"])
    with pytest.raises(DatasetError, match=r"lacks \['cross'\]") as caught:
        load_eval_split(str(lacking), config, keep_unknown_classes=True)  # the model's classes must all be there
    assert "held-out" not in str(caught.value)


# ----- `evaluate` and `freetickets evaluate` with the suite -------------------------------------------


def test_at_temperature_1_is_the_uncalibrated_model(tmp_path) -> None:
    model = save_tiny_ensemble(tmp_path / "model", logit_spread=4.0)
    images = torch.from_numpy(np.stack(random_images(30))).unsqueeze(1)
    data = EvalSplit("toy", "test", images, torch.arange(30) % 3)
    ood = [synthetic_split("synthetic:gaussian", data), shifted_split("shift:invert", data)]
    plain = evaluate(model, data, ood=ood)
    for name in ("synthetic:gaussian", "shift:invert"):  # T = 1: both blocks are the same numbers
        assert {s: plain["ood"][name][s] for s in OOD_SCORES} == plain["ood"][name]["at_temperature_1"]
    model.set_temperature(4.0, fit_on="test")
    calibrated = evaluate(model, data, ood=ood)
    for name in ("synthetic:gaussian", "shift:invert"):
        result = calibrated["ood"][name]
        assert result["at_temperature_1"] == plain["ood"][name]["at_temperature_1"]
        assert result["entropy"] != result["at_temperature_1"]["entropy"]  # the temperature changes the ranking
    assert calibrated["ood"]["synthetic:gaussian"]["kind"] == "far"
    assert calibrated["ood"]["shift:invert"]["kind"] == "shifted"
    summary = calibrated["ood_summary"]
    assert set(summary) == {"far", "shifted"} and summary["far"]["sets"] == ["synthetic:gaussian"]
    assert summary["far"]["auroc"]["entropy"] == calibrated["ood"]["synthetic:gaussian"]["entropy"]["auroc"]
    assert (
        summary["shifted"]["auroc_at_temperature_1"]["mutual_information"]
        == plain["ood"]["shift:invert"]["mutual_information"]["auroc"]
    )


@pytest.fixture(scope="module")
def without_cross(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """A tiny EDST run trained on circles and squares only (recipe key exclude_classes)."""
    out = tmp_path_factory.mktemp("without_cross")
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(out)]
    for item in (f"dataset={tiny_dataset}", *TINY, "exclude_classes=[cross]", "num_members=2"):
        args += ["--set", item]
    assert main([*args, "--set", "explore_epochs=1", "--set", "refine_epochs=1"]) == 0
    return out


def test_evaluate_cli_runs_the_suite_with_held_out_classes(without_cross, tiny_dataset, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    argv = ["evaluate", str(without_cross), "--dataset", str(tiny_dataset), "--max-samples", "30"]
    argv += ["--ood-dataset", "suite", "--ood-dataset", "shift:contrast@2", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    names = ["sklearn:digits", *(f"synthetic:{s}" for s in SYNTHETIC), *(f"shift:{s}" for s in SHIFTS)]
    asked = [*names, "held-out", "shift:contrast@2"]
    assert sorted(results["ood"]) == sorted(asked)  # the JSON's keys are sorted; the report keeps the order
    listed = [line.split(" (")[0] for line in printed.splitlines() if line.split(" (")[0] in results["ood"]]
    assert listed == asked

    # the in-distribution split keeps the model's classes; the 30-image subset's crosses are the held-out set
    ds = datasets.load_dataset(str(tiny_dataset), split="test")
    keep = np.sort(np.random.default_rng(0).choice(len(ds), 30, replace=False))
    labels = np.asarray(ds["label"])[keep]
    crosses = int((labels == LABELS.index("cross")).sum())
    assert 0 < crosses < 30 and results["num_images"] == 30 - crosses
    held_out = results["ood"]["held-out"]
    assert held_out["num_images"] == crosses and held_out["kind"] == "near" and held_out["classes"] == ["cross"]
    model = EnsembleModel.from_pretrained(without_cross)
    outputs = model.predict([ds[int(i)]["image"] for i in keep])
    entropy = -torch.from_numpy(outputs.entropy)
    is_cross = torch.from_numpy(labels == LABELS.index("cross"))
    expected = detection_metrics(entropy[~is_cross], entropy[is_cross])
    assert held_out["entropy"]["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)

    for name, result in results["ood"].items():
        assert result["kind"] == ood_kind(name)
        sizes = {"sklearn:digits": 30, "held-out": crosses}  # --max-samples caps each loaded set
        assert result["num_images"] == sizes.get(name, 30 - crosses)  # generated and shifted: the in-dist size
        for block in (result, result["at_temperature_1"]):
            assert {s: set(block[s]) for s in OOD_SCORES} == {s: {"auroc", "aupr", "fpr_at_95_tpr"} for s in OOD_SCORES}
        line = next(line for line in printed.splitlines() if line.startswith(f"{name} ("))
        assert f" {result['kind']} " in line and f"{result['entropy']['auroc']:.4f}" in line
    summary = results["ood_summary"]
    assert set(summary) == {"far", "shifted", "near"} and summary["near"]["sets"] == ["held-out"]
    assert summary["shifted"]["sets"] == [*(f"shift:{s}" for s in SHIFTS), "shift:contrast@2"]
    shifted = [results["ood"][n]["msp"]["auroc"] for n in summary["shifted"]["sets"]]
    assert summary["shifted"]["auroc"]["msp"] == pytest.approx(sum(shifted) / len(shifted))
    assert "mean of 12 set(s)" in printed and "ood_summary" in results["conventions"]


def test_held_out_classes_need_asking_for_and_exist(without_cross, tiny_dataset, tmp_path, capsys) -> None:
    base = ["evaluate", str(without_cross), "--max-samples", "12", "--output", str(tmp_path / "r.json")]
    assert main([*base, "--dataset", str(tiny_dataset)]) == 2  # crosses, and no held-out asked for
    assert "score ['cross'] as near-OOD, pass `--ood-dataset held-out`" in capsys.readouterr().err
    assert main([*base, "--dataset", str(tiny_dataset), "--ood-dataset", "synthetic:uniform"]) == 2
    assert "--ood-dataset held-out" in capsys.readouterr().err
    two = write_dataset(tmp_path / "two", {"test": (random_images(6), [0, 1] * 3)}, ["circle", "square"])
    assert main([*base, "--dataset", str(two), "--ood-dataset", "held-out"]) == 2
    assert "needs an evaluation dataset with classes the model was not trained on" in capsys.readouterr().err
    assert main([*base, "--dataset", str(two), "--ood-dataset", "suite"]) == 0  # suite: held-out only if there is one
    assert "held-out" not in json.loads((tmp_path / "r.json").read_text())["ood"]
    assert main([*base, "--dataset", str(two), "--ood-dataset", "synthetic:pink"]) == 2
    assert "unknown OOD source 'synthetic:pink'; synthetic sets are" in capsys.readouterr().err


def test_a_full_suite_evaluation_writes_the_cards_ood_limitations(without_cross, tiny_dataset, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(without_cross, folder)
    assert main(["evaluate", str(folder), "--dataset", str(tiny_dataset), "--ood-dataset", "suite"]) == 0
    results = json.loads((folder / "eval_results.json").read_text())
    card = (folder / "README.md").read_text()
    near = results["ood"]["held-out"]["entropy"]["auroc"]
    assert "- **near-OOD** (classes the model was not trained on: cross): " in card
    assert f"`held-out` ({near:.3f})" in card
    for name in results["ood"]:
        assert f"`{name}` ({results['ood'][name]['entropy']['auroc']:.3f})" in card
