"""Selective prediction end to end: ``calibrate`` / ``evaluate``, the card, both engines and ``handler.py``."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from freetickets_hub import EnsembleModel
from freetickets_hub.artifact.config import SelectiveConfig
from freetickets_hub.cli import main
from freetickets_hub.cli.calibrate import _calibration_rows
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.export import export_onnx
from freetickets_hub.export.verify import synthetic_images
from freetickets_hub.uncertainty.outputs import combine_member_logits
from freetickets_hub.uncertainty.selective import decide

from .test_evaluation import LABELS, random_images, save_tiny_ensemble, write_dataset
from .test_hub_offline import _load_handler
from .test_onnx_export import make_ensemble


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A saved model; data labelled by it with its least confident quarter wrong; data with random labels."""
    tmp_path = tmp_path_factory.mktemp("selective")
    model = save_tiny_ensemble(tmp_path / "model")
    images = random_images(400, seed=1)
    predictions = model.predict(images)
    labels = predictions.label_ids.copy()
    doubtful = np.argsort(predictions.confidence)[:100]
    labels[doubtful] = (labels[doubtful] + 1) % len(LABELS)
    easy = write_dataset(tmp_path / "easy", {"train": (images, labels.tolist())}, LABELS)
    noise = np.random.default_rng(0).integers(0, len(LABELS), 400).tolist()
    noisy = write_dataset(tmp_path / "noisy", {"train": (images, noise)}, LABELS)
    return tmp_path / "model", easy, noisy


def _calibrate(model: Path, data: Path, *extra: str) -> int:
    return main(["calibrate", str(model), "--dataset", str(data), "--split", "train", *extra])


@pytest.fixture(scope="module")
def calibrated(folders, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The model calibrated with a threshold and conformal sets into a new folder, and what calibrate printed."""
    model_dir, easy, _ = folders
    out = tmp_path_factory.mktemp("calibrated") / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # capsys is function-scoped
        code = _calibrate(model_dir, easy, "--target-risk", "0.1", "--conformal-alpha", "0.1", "--output", str(out))
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def test_calibrate_fits_temperature_then_rule_on_disjoint_halves(folders, calibrated):
    _, easy, _ = folders
    out, printed = calibrated
    ensemble = json.loads((out / "config.json").read_text())["ensemble"]
    rule = ensemble["selective"]
    assert ensemble["calibration"]["fit_on"] == f"{easy.name}:train (200 of 400 images)"  # no machine path
    assert str(easy.parent) not in (out / "config.json").read_text()
    assert str(easy.parent) not in (out / "README.md").read_text()
    assert rule["n"] == 200 and "the other half fitted the temperature" in rule["fit_on"]
    assert rule["score"] == "confidence" and rule["target_risk"] == 0.1 and rule["delta"] == 0.1
    assert rule["calibration_risk"] <= 0.1 and 0 < rule["calibration_coverage"] < 1
    assert rule["conformal_score"] == "lac" and rule["conformal_alpha"] == 0.1
    assert f"answer when confidence >= {rule['threshold']:.6g}" in printed
    card = (out / "README.md").read_text()
    assert "## Selective prediction" in card and "do **not** hold under distribution shift" in card
    assert f"at most {rule['target_risk']:g}" in card

    loaded = EnsembleModel.from_pretrained(out)  # predict applies the stored rule
    images = random_images(30, seed=9)
    predictions = loaded.predict(images)
    assert predictions.abstain is not None and 0 < predictions.abstain.sum() < 30
    np.testing.assert_array_equal(predictions.abstain, predictions.confidence < rule["threshold"])
    kept = [[k for k in range(3) if 1 - predictions.probs[i, k] <= rule["conformal_quantile"]] for i in range(30)]
    assert [sorted(s) for s in predictions.prediction_sets] == kept


def test_a_temperature_fitted_on_few_images_is_flagged_unreliable(folders, tmp_path, capsys):
    model_dir, easy, _ = folders
    assert _calibrate(model_dir, easy, "--max-samples", "30", "--output", str(tmp_path / "out")) == 0
    assert "fitted on 30 images, fewer than 200: it is unreliable" in capsys.readouterr().err


def test_calibration_rows_are_disjoint_halves_covering_the_split():
    args = argparse.Namespace(target_risk=0.1, conformal_alpha=None, keep_temperature=False)
    temperature, rule = _calibration_rows(args, 101)
    assert not set(temperature) & set(rule) and sorted([*temperature, *rule]) == list(range(101))
    assert abs(len(temperature) - len(rule)) <= 1
    args.keep_temperature = True
    assert _calibration_rows(args, 10)[0] is None and list(_calibration_rows(args, 10)[1]) == list(range(10))


def test_no_threshold_meeting_the_risk_exits_3_storing_nothing(folders, capsys):
    model_dir, _, noisy = folders
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    # random labels: the temperature alone would already be a degenerate fit, so keep it and fit only the rule
    assert _calibrate(model_dir, noisy, "--target-risk", "0.05", "--keep-temperature") == 3
    assert "nothing stored: no confidence threshold keeps the error rate" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before


def test_keep_temperature_fits_the_rule_on_every_image_then_a_new_temperature_drops_it(
    folders, tmp_path, capsys, caplog
):
    model_dir, easy, _ = folders
    out = tmp_path / "kept"
    code = _calibrate(model_dir, easy, "--target-risk", "0.1", "--score", "entropy", "--conformal-alpha", "0.2",
                      "--conformal-score", "aps", "--keep-temperature", "--output", str(out))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())["ensemble"]
    assert config["calibration"] is None  # the temperature was kept (1.0), not refitted
    assert config["selective"]["n"] == 400 and config["selective"]["score"] == "entropy"
    assert config["selective"]["conformal_score"] == "aps"
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert _calibrate(out, easy) == 0
    assert "stored selective rule was fitted on the old temperature's outputs; dropped it" in caplog.text
    assert json.loads((out / "config.json").read_text())["ensemble"]["selective"] is None
    assert _calibrate(out, easy, "--keep-temperature") == 2  # nothing to fit


@pytest.mark.parametrize("flag", ["--target-risk", "--conformal-alpha", "--delta"])
@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_out_of_range_flags_are_refused(folders, flag, value, capsys):
    with pytest.raises(SystemExit):
        _calibrate(folders[0], folders[1], flag, value)
    assert "expected a number in (0, 1)" in capsys.readouterr().err


def test_evaluate_reports_the_stored_rule_and_risk_at_coverage(folders, calibrated, tmp_path, capsys):
    _, easy, _ = folders
    out = tmp_path / "evaluated"
    shutil.copytree(calibrated[0], out)
    argv = ["evaluate", str(out), "--dataset", str(easy), "--split", "train", "--plots", str(out / "assets")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    selective = json.loads((out / "eval_results.json").read_text())["selective"]
    rule = selective["stored_rule"]
    assert set(selective["risk_at_coverage"]) == {"0.80", "0.95"}
    assert selective["risk_at_coverage"]["0.80"] == selective["risk"][79]
    model = EnsembleModel.from_pretrained(out)
    probs = model.predict(random_images(400, seed=1)).probs
    answered = probs.max(1) >= model.config.ensemble.selective.threshold
    assert rule["threshold"]["coverage"] == pytest.approx(answered.mean())
    assert rule["threshold"]["answered"] == answered.sum()
    assert 0.0 <= rule["conformal"]["coverage"] <= 1.0 and rule["conformal"]["mean_set_size"] > 0
    assert f"stored abstention rule (confidence >= {rule['threshold']['threshold']:.6g}): coverage" in printed
    assert "risk at 80% coverage" in printed and "stored conformal sets (lac, alpha 0.1)" in printed
    card = (out / "README.md").read_text()
    assert "marks the stored rule's operating point" in card
    assert f"On the evaluation split it answered {100 * rule['threshold']['coverage']:.2f} %" in card


# ----- both engines and handler.py give the same decisions ------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleModel, Path, list]:
    """A calibrated ensemble with a rule that abstains on about half the images, saved and exported."""
    folder = tmp_path_factory.mktemp("engines")
    model = make_ensemble(seed=3)
    model.set_temperature(1.3, fit_on="test")
    images = synthetic_images(model.config.pretrained_cfg, 16, seed=5)
    with torch.inference_mode():
        probs = model(torch.from_numpy(preprocess(images, model.config.pretrained_cfg))).probs.numpy()
    model.config.ensemble.selective = SelectiveConfig(
        n=100, fit_on="toy", score="confidence", threshold=float(np.median(probs.max(1))), target_risk=0.1,
        delta=0.1, calibration_coverage=0.5, calibration_risk=0.05, conformal_alpha=0.1, conformal_score="aps",
        conformal_quantile=float(np.median(probs.max(1))),
    )  # fmt: skip
    model.save_pretrained(folder)
    export_onnx(model, folder)
    return model, folder, images


def test_both_engines_and_the_handler_agree_on_abstain_and_sets(exported):
    model, folder, images = exported
    torch_predictions = EnsembleModel.from_pretrained(folder).predict(images)
    onnx_predictions = OnnxEnsemble.from_pretrained(folder, providers=["CPUExecutionProvider"]).predict(images)
    assert 3 <= torch_predictions.abstain.sum() <= 13  # the rule really decides something here
    np.testing.assert_array_equal(onnx_predictions.abstain, torch_predictions.abstain)
    assert onnx_predictions.prediction_sets == torch_predictions.prediction_sets
    assert len({len(s) for s in torch_predictions.prediction_sets}) > 1
    handler = _load_handler(folder)(str(folder))
    answers = handler({"inputs": images, "parameters": {"top_k": 2}})
    for answer, record in zip(answers, torch_predictions.to_records(), strict=True):
        assert {entry["abstain"] for entry in answer} == {record["abstain"]}
        assert answer[0]["prediction_set"] == record["prediction_set"]
    # the rule comes from the stored numbers through the one numpy function
    pixels = torch.from_numpy(preprocess(images, model.config.pretrained_cfg))
    with torch.inference_mode():
        out = combine_member_logits(model.member_logits(pixels), model.temperature)
    outputs = {key: getattr(out, key).numpy() for key in ("probs", "entropy", "mutual_information")}
    abstain, sets = decide(outputs, model.config.ensemble.selective)
    np.testing.assert_array_equal(abstain, torch_predictions.abstain)
    assert sets == torch_predictions.prediction_sets


@pytest.mark.parametrize("top_k", [0, 11, "3", True, 2.0])
def test_handler_refuses_a_bad_top_k(exported, top_k):
    _, folder, images = exported
    handler = _load_handler(folder)(str(folder))
    with pytest.raises(ValueError, match=rf"parameters.top_k must be an integer from 1 to 10 classes, got {top_k!r}"):
        handler({"inputs": images[0], "parameters": {"top_k": top_k}})


@pytest.mark.parametrize("stored", ["both", "sets only"])
def test_predict_table_shows_abstain_and_the_prediction_set(exported, tmp_path, capsys, stored):
    """The table, not only --json, says when the model abstains and which labels its conformal set holds."""
    from PIL import Image

    _, folder, images = exported
    if stored == "sets only":
        folder = Path(shutil.copytree(folder, tmp_path / "sets"))
        config = json.loads((folder / "config.json").read_text())
        rule = config["ensemble"]["selective"]
        for key in ("score", "threshold", "target_risk", "delta", "calibration_coverage", "calibration_risk"):
            rule[key] = None
        (folder / "config.json").write_text(json.dumps(config))
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(np.asarray(image)).save(paths[-1])
    assert main(["predict", str(folder), *paths, "--backend", "torch"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert main(["predict", str(folder), *paths, "--backend", "torch", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert ("abstain" in rows[0]) == (stored == "both") and "prediction set" in rows[0]
    for row, record in zip(rows[1:], records, strict=False):
        assert row.endswith("{" + ", ".join(record["prediction_set"]) + "}"), row
        if stored == "both":
            assert f" {'yes' if record['abstain'] else 'no'}  {{" in row, row
    if stored == "both":
        assert {"yes", "no"} <= {row.split()[6] for row in rows[1:-1]}  # the rule really splits these images
