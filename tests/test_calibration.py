"""Temperature scaling of the ensemble: the fit itself, and ``freetickets calibrate`` on a saved folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from freetickets_hub import EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.uncertainty.calibration import TEMPERATURE_BOUNDS, ensemble_nll, fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

from .test_evaluation import LABELS, model_labels, random_images, save_tiny_ensemble, write_dataset


def test_closed_form_temperature():
    # one member, 3 of 4 right at logit gap 4: the NLL is minimal where softmax(4 / T) = 3/4
    logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]])
    fit = fit_temperature(logits, torch.tensor([0, 1, 0, 0]))
    assert fit.temperature == pytest.approx(4 / math.log(3), rel=1e-4)
    assert not fit.degenerate and fit.nll_after < fit.nll_before


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_recovers_the_temperature_that_generated_the_labels(true_temperature):
    # labels drawn from the ensemble's mean of softmax(z_m / T0): the NLL fit must find T0 again
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8000, 4, generator=generator, dtype=torch.float64) * 3
    probs = combine_member_logits(logits, true_temperature).probs
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fit.nll_after == pytest.approx(ensemble_nll(logits, labels, fit.temperature))
    after = classification_metrics(combine_member_logits(logits, fit.temperature).probs, labels)
    assert fit.ece_after == pytest.approx(after["ece"]) and fit.ece_after < 0.02


def test_all_correct_split_is_degenerate():
    logits = torch.tensor([[[3.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 2.5]]])
    fit = fit_temperature(logits, torch.tensor([0, 1]))
    assert fit.degenerate and "lower bound" in fit.reason
    assert fit.temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=0.2)


# ----- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A saved model, a dataset labelled by its own predictions (30 % flipped), and a one-member model."""
    tmp_path = tmp_path_factory.mktemp("calibrate")
    model = save_tiny_ensemble(tmp_path / "model")
    single = save_tiny_ensemble(tmp_path / "single", num_members=1)
    images = random_images(60, seed=1)
    split = {"train": (images, model_labels(model, images, flip=0.3))}
    exact = {"validation": (images[:20], model_labels(single, images[:20], flip=0))}  # the single member is all right
    write_dataset(tmp_path / "single_data", exact, LABELS)
    return tmp_path / "model", write_dataset(tmp_path / "noisy", split, LABELS), tmp_path / "single"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_calibrate_stores_the_temperature_in_config_and_card_only(folders, capsys):
    model_dir, noisy, _ = folders
    before = _files(model_dir)
    assert main(["calibrate", str(model_dir), "--dataset", str(noisy), "--split", "train[:50]"]) == 0
    printed = capsys.readouterr().out
    after = _files(model_dir)
    assert set(after) == set(before)
    changed = [name for name in before if before[name] != after[name]]
    assert "README.md" in before  # a saved folder has its card
    assert changed == ["README.md", "config.json"]
    calibration = json.loads(after["config.json"])["ensemble"]["calibration"]
    assert calibration["fit_on"] == f"{noisy.name}:train[:50] (50 images)"  # no machine path
    temperature = calibration["temperature"]
    assert math.isfinite(temperature) and temperature > 0 and f"-> {temperature:.4f}" in printed
    assert f"{temperature:.4f}" in after["README.md"].decode()  # the card shows the new temperature
    nll_before, nll_after = (
        float(line.split()[1]) for line in printed.splitlines() if line.startswith(("before", "after"))
    )
    assert nll_after <= nll_before

    model = EnsembleModel.from_pretrained(model_dir)  # every output applies the stored temperature
    pixels = torch.randn(5, 1, 12, 12)
    expected = combine_member_logits(model.member_logits(pixels), temperature)
    torch.testing.assert_close(model(pixels).probs, expected.probs)
    assert model.temperature == temperature


def test_calibrate_refuses_test_split_unless_forced(folders, capsys):
    model_dir, noisy, _ = folders
    config = (model_dir / "config.json").read_bytes()
    assert main(["calibrate", str(model_dir), "--dataset", str(noisy), "--split", "test"]) == 2
    assert "refusing to fit on split 'test'" in capsys.readouterr().err
    assert (model_dir / "config.json").read_bytes() == config


def test_degenerate_fit_is_reported_and_not_stored(folders, capsys):
    single = folders[2]
    config = (single / "config.json").read_bytes()
    data = single.parent / "single_data"
    assert main(["calibrate", str(single), "--dataset", str(data), "--split", "validation"]) == 3
    assert "degenerate fit, temperature not stored" in capsys.readouterr().err
    assert (single / "config.json").read_bytes() == config


def test_hub_id_needs_output(folders, capsys):
    _, noisy, _ = folders
    assert main(["calibrate", "someone/ensemble", "--dataset", str(noisy), "--split", "train"]) == 2
    assert "pass --output-dir DIR" in capsys.readouterr().err
