"""The model card: metadata and model-index from the run's own evaluation, and a body built from the folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from freetickets_hub import EnsembleModel

from .conftest_hub import make_ensemble

SUMMARY = {
    "dataset": "../shared/datasets/fashion_mnist",
    "recipe": {"method": "edst", "architecture": "cifar_wrn10_2", "lr": 0.1, "test_split": "test"},
    "test_split_description": "fashion_mnist [test], 2000 images",
    "test": {
        "ensemble": {"accuracy": 0.8125, "nll": 0.52, "ece": 0.031, "brier": 0.27, "disagreement": 0.1},
        "member_0": {"accuracy": 0.79, "nll": 0.6, "ece": 0.05, "brier": 0.3},
        "member_1": {"accuracy": 0.8, "nll": 0.58, "ece": 0.04, "brier": 0.29},
    },
    "sparsity": {"target": 0.8, "realised": [0.8, 0.8]},
    "costs": {"inference_flops_member": 12_345_678, "inference_flops_ensemble": 24_691_356},
}
EVAL_RESULTS = {
    "dataset": "zalando-datasets/fashion_mnist",
    "split": "test",
    "num_images": 10000,
    "ensemble": {"accuracy": 0.9001, "nll": 0.3, "ece": 0.012, "brier": 0.15, "mean_disagreement": 0.05},
    "members": [{"member": 0, "accuracy": 0.88, "nll": 0.35, "ece": 0.02, "brier": 0.17}],
    "ood": {"sklearn:digits": {"msp": {"auroc": 0.9}}},
}


@pytest.fixture(scope="module")
def model() -> EnsembleModel:
    return make_ensemble(seed=0, members=2, method="dst")


def _save(model: EnsembleModel, folder: Path, **files: dict[str, Any]) -> ModelCard:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    model.save_pretrained(folder)
    return ModelCard.load(folder / "README.md")


def _metrics(card: ModelCard) -> dict[str, float]:
    results = card.data.eval_results
    assert all(isinstance(r, EvalResult) for r in results)
    return {r.metric_type: r.metric_value for r in results}


def test_metadata_and_model_index_from_the_training_summary(model: EnsembleModel, tmp_path: Path) -> None:
    card = _save(model, tmp_path / "run", train_summary=SUMMARY)
    card_data = card.data
    assert isinstance(card_data, ModelCardData)
    metadata = card_data.to_dict()
    assert (metadata["library_name"], metadata["pipeline_tag"], metadata["license"]) == (
        "freetickets-hub",
        "image-classification",
        "apache-2.0",
    )
    assert {"ensemble", "sparse", "uncertainty-estimation", "model-calibration", "timm", "dst"} <= set(card_data.tags)
    assert card_data.datasets is None  # a local folder is not a Hub dataset id
    assert _metrics(card) == {"accuracy": 0.8125, "nll": 0.52, "ece": 0.031, "brier": 0.27}
    result = card_data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "image-classification",
        "fashion_mnist",
        "test",
    )
    assert card_data.model_name == "cifar_wrn10_2 DST ensemble (M=2)"
    text = card.text
    assert "Measured on fashion_mnist [test], 2000 images (from `train_summary.json`)" in text
    assert "| member_1 | 0.8000 | 0.5800 | 0.0400 | 0.2900 |" in text
    assert "12.35 MFLOPs per member, 24.69 MFLOPs for the ensemble" in text
    assert "lr: 0.1" in text  # the recipe
    assert re.search(r"\| 1 \| [\d,]+ of [\d,]+ \| 0\.8000 \|", text)  # sparsity over all conv/linear weights


def test_eval_results_file_is_preferred(model: EnsembleModel, tmp_path: Path) -> None:
    card = _save(model, tmp_path / "run", train_summary=SUMMARY, eval_results=EVAL_RESULTS)
    assert _metrics(card) == {"accuracy": 0.9001, "nll": 0.3, "ece": 0.012, "brier": 0.15}
    assert card.data.eval_results[0].dataset_type == "zalando-datasets/fashion_mnist"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert "Measured on zalando-datasets/fashion_mnist [test], 10000 images (from `eval_results.json`)" in card.text
    assert "| 0 | " in card.text and " | 0.8800 |" in card.text  # member 0's accuracy in the members table


def test_body_without_evaluation_says_na_and_reads_bytes_from_the_file(model: EnsembleModel, tmp_path: Path) -> None:
    card = _save(model, tmp_path / "bare")
    assert card.data.eval_results is None and "model-index" not in card.content
    text = card.text
    assert "## Evaluation" not in text
    assert "n/a per member, n/a for the ensemble" in text
    assert f"{(tmp_path / 'bare' / 'model.safetensors').stat().st_size:,}" in text
    assert text.count("| n/a |") == 2  # one row per member, no test accuracy to show
    assert "Uncalibrated (temperature 1.0)" in text
    assert 'EnsembleModel.from_pretrained("bare")' in text
    assert "https://arxiv.org/abs/2106.14568" in text and "## Limitations" in text


def test_calibration_base_model_assets_and_repo_id(model: EnsembleModel, tmp_path: Path) -> None:
    folder = tmp_path / "ft"
    (folder / "assets").mkdir(parents=True)
    (folder / "assets" / "reliability.png").write_bytes(b"png")
    calibrated = make_ensemble(seed=1, members=2)
    calibrated.set_temperature(1.25, fit_on="fashion_mnist:validation (5000 images)")
    calibrated.save_pretrained(folder, extras_from=folder, repo_id="me/ft-ensemble")
    (folder / "train_summary.json").write_text(
        json.dumps({**SUMMARY, "base_model": "freetickets/wrn-edst", "base_model_is_repo_id": True})
    )
    calibrated.save_pretrained(folder, repo_id="me/ft-ensemble")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "freetickets/wrn-edst"
    assert "Fine-tuned from [`freetickets/wrn-edst`]" in card.text
    assert "temperature of 1.2500 (fitted on fashion_mnist:validation (5000 images))" in card.text
    assert "![assets/reliability.png](assets/reliability.png)" in card.text
    assert 'EnsembleModel.from_pretrained("me/ft-ensemble")' in card.text


def test_non_numeric_metrics_are_left_out(model: EnsembleModel, tmp_path: Path) -> None:
    summary = {**SUMMARY, "test": {"ensemble": {"accuracy": 0.5, "nll": "NaN?", "ece": True}}}
    card = _save(model, tmp_path / "run", train_summary=summary)
    assert _metrics(card) == {"accuracy": 0.5}


def test_limitations_say_which_ood_kinds_the_ensemble_flags(model: EnsembleModel, tmp_path: Path) -> None:
    def scores(entropy: float, kind: str, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "msp": {"auroc": 0.99}, "entropy": {"auroc": entropy}, **extra}

    ood = {
        "sklearn:digits": scores(0.93, "far"),
        "synthetic:constant": scores(0.61, "far"),
        "/home/me/data/mnist": scores(0.9, "far"),  # exactly at the rule's bound: flags
        "shift:rot90": scores(0.7, "shifted"),  # at the lower bound: partly
        "shift:contrast": scores(0.69, "shifted"),
        "held-out": scores(0.55, "near", classes=["Shirt", "Sneaker"]),
    }
    text = _save(model, tmp_path / "run", eval_results={**EVAL_RESULTS, "ood": ood}).text
    limitations = text[text.index("## Limitations") : text.index("## Citation")]
    assert "Ensembles improve calibration and out-of-distribution detection on average" in limitations
    assert "**flags** a set at AUROC >= 0.9, **partly flags** it at 0.7 to 0.9, and **does not flag** it below 0.7" in (
        " ".join(limitations.split())
    )
    assert (
        "- **far-OOD** (other datasets and generated images): flags `sklearn:digits` (0.930), `mnist` (0.900); "
        "does not flag `synthetic:constant` (0.610)." in limitations
    )
    assert "partly flags `shift:rot90` (0.700); does not flag `shift:contrast` (0.690)." in limitations
    assert (
        "- **near-OOD** (classes the model was not trained on: Shirt, Sneaker): does not flag `held-out` (0.550)."
        in limitations
    )
    assert "/home/me" not in text and "not measured" not in limitations

    only_far = _save(
        model, tmp_path / "far", eval_results={**EVAL_RESULTS, "ood": {"sklearn:digits": ood["sklearn:digits"]}}
    )
    assert "- **near-OOD**: not measured (train with the recipe key `exclude_classes`" in only_far.text
    assert "- **shifted**: not measured" in only_far.text
    no_entropy = _save(model, tmp_path / "old", eval_results=EVAL_RESULTS).text  # an ood block without entropy
    assert "Which out-of-distribution inputs this ensemble flags" not in no_entropy
    assert "## Limitations" in no_entropy


def _int8_report(source: str) -> dict[str, Any]:
    quality = {"accuracy": 0.9, "nll": 0.3, "ece": 0.01}
    return {
        "graph": "onnx/model.onnx",
        "graph_bytes": 1000,
        "fp16": False,
        "batch_sizes": [1],
        "gated_outputs": ["probs"],
        "max_abs_diff": {"probs": 1e-7},
        "int8": {"graph": "onnx/model.int8.onnx", "graph_bytes": 500, "agreement": 0.995, "fp32": quality,
                 "int8": quality, "held_out_images": 2000, "source": source},
    }  # fmt: skip


def test_no_machine_path_reaches_the_card(model: EnsembleModel, tmp_path: Path) -> None:
    """Artifacts written before the fix (absolute paths in config, summary and export report) render without them."""
    from freetickets_hub.artifact.config import SelectiveConfig

    machine = "/home/someone/private/data"
    calibrated = make_ensemble(seed=1, members=2)
    calibrated.set_temperature(1.25, fit_on=f"{machine}/fmnist:validation (5000 images)")
    calibrated.config.ensemble.selective = SelectiveConfig(
        n=2500, fit_on=f"{machine}/fmnist:validation (2500 of 5000 images)", conformal_alpha=0.1,
        conformal_score="lac", conformal_quantile=0.9,
    )  # fmt: skip
    folder = tmp_path / "ft"
    (folder / "onnx").mkdir(parents=True)
    for graph in ("model.onnx", "model.int8.onnx"):
        (folder / "onnx" / graph).write_bytes(b"graph")
    (folder / "onnx" / "export_report.json").write_text(json.dumps(_int8_report(f"{machine}/fmnist:validation")))
    summary = {
        **SUMMARY,
        "dataset": "${FREETICKETS_DATASETS}/fashion_mnist",
        "test_split_description": "${FREETICKETS_DATASETS}/fashion_mnist [test], 2000 images",
        "recipe": {**SUMMARY["recipe"], "dataset": "${FREETICKETS_DATASETS}/fashion_mnist"},
        "base_model": str(tmp_path / "ft"),  # a folder that exists where the card is rendered
        "base_model_revision": None,
        "base_model_relation": "finetune",
    }
    (folder / "train_summary.json").write_text(json.dumps(summary))
    calibrated.save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert machine not in card.content and str(tmp_path) not in card.content and "${" not in card.content
    assert "Fitted on fmnist:validation (2500 of 5000 images)" in card.text
    assert "held-out images of fmnist:validation" in card.text
    assert "Fine-tuned from `ft`." in card.text and "huggingface.co/" not in card.text.split("## Usage")[0]
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert "fashion_mnist [test], 2000 images" in card.text


def test_a_local_base_recorded_at_fine_tuning_is_never_linked(model: EnsembleModel, tmp_path: Path) -> None:
    """A base recorded as a local folder gets no Hub link, whatever exists where the card is rendered."""
    summary = {**SUMMARY, "base_model": "demo", "base_model_is_repo_id": False, "base_model_relation": "finetune"}
    card = _save(model, tmp_path / "ft", train_summary=summary)
    assert "Fine-tuned from `demo`." in card.text and card.data.base_model is None
    hub = {**summary, "base_model": "freetickets/wrn-edst", "base_model_is_repo_id": True}
    card = _save(model, tmp_path / "hub", train_summary=hub)
    assert "Fine-tuned from [`freetickets/wrn-edst`](https://huggingface.co/freetickets/wrn-edst)" in card.text
    assert card.data.base_model == "freetickets/wrn-edst" and card.data.base_model_relation == "finetune"


def _calibrated(tmp_path: Path, **files: dict[str, Any]) -> ModelCard:
    folder = tmp_path / "cal"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    calibrated = make_ensemble(seed=1, members=2, method="dst")
    calibrated.set_temperature(1.3, fit_on="fashion_mnist:validation (5000 images)")
    calibrated.save_pretrained(folder)
    return ModelCard.load(folder / "README.md")


def test_a_calibrated_card_labels_uncalibrated_and_calibrated_numbers(tmp_path: Path) -> None:
    after = {**EVAL_RESULTS, "dataset": "fashion_mnist", "temperature": 1.3}
    card = _calibrated(tmp_path, train_summary=SUMMARY, eval_results=after)
    table = card.text.split("## Evaluation")[1]
    assert "| ensemble (calibrated, T = 1.3000) | 0.9001 | 0.3000 | 0.0120 | 0.1500 |" in table
    assert "| ensemble (T = 1, uncalibrated) | 0.8125 | 0.5200 | 0.0310 | 0.2700 |" in table
    assert "| member_0 (calibrated, T = 1.3000) |" in table and "measured before the stored temperature" not in table
    named = {(r.metric_name, r.metric_value, (r.metric_args or {}).get("temperature")) for r in card.data.eval_results}
    assert ("NLL (calibrated, T = 1.3000)", 0.3, 1.3) in named and ("NLL (T = 1, uncalibrated)", 0.52, 1.0) in named
    assert ("ECE (15 bins) (calibrated, T = 1.3000)", 0.012, 1.3) in named


def test_a_calibrated_card_with_only_training_numbers_says_they_are_uncalibrated(tmp_path: Path) -> None:
    card = _calibrated(tmp_path, train_summary=SUMMARY)
    table = card.text.split("## Evaluation")[1]
    assert "| ensemble (T = 1, uncalibrated) | 0.8125 |" in table and "calibrated, T" not in table
    assert "measured before the stored temperature of 1.3000 was fitted" in table
    assert {r.metric_name for r in card.data.eval_results} >= {"NLL (T = 1, uncalibrated)"}


@pytest.mark.parametrize(
    ("method", "shown", "hidden"),
    [
        ("edst", ["explore_epochs: 6", "refine_epochs: 1"], ["epochs: 10", "lr_milestones"]),
        ("dst", ["epochs: 10", "lr_milestones"], ["explore_epochs", "refine_lrs", "escape_rate"]),
        ("dense", ["epochs: 10"], ["sparsity", "prune_rate", "explore_epochs"]),
    ],
)
def test_the_recipe_block_shows_only_the_keys_its_method_reads(
    model: EnsembleModel, tmp_path: Path, method: str, shown: list[str], hidden: list[str]
) -> None:
    recipe = {
        "method": method, "epochs": 10, "lr_milestones": [0.5, 0.75], "explore_epochs": 6, "refine_epochs": 1,
        "refine_lrs": [0.01], "escape_rate": 0.8, "sparsity": 0.8, "prune_rate": 0.5, "lr": 0.1,
    }  # fmt: skip
    card = _save(model, tmp_path / method, train_summary={**SUMMARY, "recipe": recipe})
    block = card.text.split("## Training recipe")[1].split("```")[1]
    assert all(key in block for key in shown) and not any(key in block for key in hidden) and "lr: 0.1" in block
