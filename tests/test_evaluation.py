"""The evaluation suite: metrics against independent implementations, the CLI end to end, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.errors import DatasetError
from freetickets_hub.evaluation import (
    EVAL_RESULTS_NAME,
    PLOT_NAMES,
    load_eval_split,
    mask_distance,
    prediction_diversity,
)
from freetickets_hub.training.random_ensemble import random_sparse_ensemble
from freetickets_hub.uncertainty.metrics import (
    classification_metrics,
    detection_metrics,
    reliability_bins,
    risk_coverage,
)

LABELS = ["circle", "square", "cross"]


# ----- helpers shared with test_calibration.py and test_eval_distributed.py ---------------------------


def save_tiny_ensemble(
    folder: Path, *, labels: list[str] = LABELS, num_members: int = 3, size: int = 12, logit_spread: float = 2.0
) -> EnsembleModel:
    """Random sparse (80 %, ERK) grayscale members whose head is scaled so that logits vary with the input."""
    config = EnsembleConfig(
        "cifar_wrn10_2",
        len(labels),
        model_args={"in_chans": 1},
        label_names=labels,
        pretrained_cfg={"input_size": [1, size, size], "mean": [0.5], "std": [0.25]},
        ensemble={"num_members": num_members, "sparsity": 0.8},
    )
    model = random_sparse_ensemble(config, logit_spread=logit_spread)
    model.save_pretrained(folder)
    return model


def write_dataset(root: Path, splits: dict[str, tuple[list, list[int]]], names: list[str], image=None) -> Path:
    """``root/data/{split}-00000-of-00001.parquet`` files that ``datasets.load_dataset(root)`` reads."""
    features = datasets.Features({"image": image or datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def random_images(count: int, size: int = 12, channels: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def model_labels(model: EnsembleModel, images: list[np.ndarray], *, flip: float, seed: int = 0) -> list[int]:
    """The model's own predictions, a share ``flip`` of them changed to another class."""
    predicted = model.predict(images).label_ids
    rng = np.random.default_rng(seed)
    num_classes = model.config.num_classes
    flips = rng.random(len(predicted)) < flip
    shifted = (predicted + rng.integers(1, num_classes, len(predicted))) % num_classes
    return np.where(flips, shifted, predicted).tolist()


# ----- metrics against independent implementations ---------------------------------------------------


def _numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == labels
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return ece


@pytest.fixture
def predictions() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(600, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.where(torch.rand(600, generator=generator) < 0.6, logits.argmax(1), torch.randint(0, 5, (600,)))
    return logits.softmax(1), labels


def test_classification_metrics_match_numpy(predictions):
    probs, labels = predictions
    got = classification_metrics(probs, labels)
    p, y = probs.numpy(), labels.numpy()
    assert got["ece"] == pytest.approx(_numpy_ece(p, y), abs=1e-6)  # torchmetrics vs a direct numpy ECE
    assert got["accuracy"] == pytest.approx((p.argmax(1) == y).mean(), abs=1e-12)
    assert got["nll"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), abs=1e-9)
    assert got["brier"] == pytest.approx(((p - np.eye(5)[y]) ** 2).sum(1).mean(), abs=1e-9)
    bins = reliability_bins(probs, labels)
    weighted_gap = sum(
        n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
    )
    assert sum(bins["count"]) == len(labels)
    assert weighted_gap / len(labels) == pytest.approx(got["ece"], abs=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_detection_metrics_match_sklearn(tied):
    rng = np.random.default_rng(1)
    inside, outside = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.5, 200)
    if tied:  # many equal scores, as MSP gives for saturated predictions
        inside, outside = inside.round(1), outside.round(1)
    got = detection_metrics(torch.from_numpy(inside), torch.from_numpy(outside))
    scores, target = np.concatenate([inside, outside]), np.r_[np.ones(300), np.zeros(200)]
    fpr, tpr, _ = roc_curve(target, scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(target, scores), abs=1e-6)
    assert got["aupr"] == pytest.approx(average_precision_score(target, scores), abs=1e-6)
    assert got["fpr_at_95_tpr"] == pytest.approx(fpr[tpr >= 0.95].min(), abs=1e-6)


def test_detection_metrics_orientation():
    perfect = detection_metrics(torch.tensor([0.9, 0.8, 0.95]), torch.tensor([0.1, 0.3]))
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "fpr_at_95_tpr": 0.0}


def test_risk_coverage_matches_brute_force(predictions):
    probs, labels = predictions
    got = risk_coverage(probs, labels)
    confidence, errors = probs.max(1).values.numpy(), (probs.argmax(1) != labels).numpy()
    order = np.argsort(-confidence, kind="stable")
    risks = [errors[order[:k]].mean() for k in range(1, len(labels) + 1)]
    assert got["aurc"] == pytest.approx(np.mean(risks), abs=1e-9)
    assert got["risk"][-1] == pytest.approx(errors.mean(), abs=1e-12)
    assert got["risk"][49] == pytest.approx(risks[299], abs=1e-12)  # coverage 0.50 = 300 of 600 accepted
    assert got["aurc_optimal"] <= got["aurc"]


def test_diversity_closed_form():
    a, b = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    masks = [{"conv.weight": a.view(2, 2), "fc.weight": a}, {"conv.weight": b.view(2, 2)}]  # fc dense in member 1
    result = mask_distance(masks)
    conv, fc = result["layers"]["conv.weight"], result["layers"]["fc.weight"]
    assert conv["jaccard"]["matrix"][0][1] == pytest.approx(2 / 3)  # |a∩b| = 1, |a∪b| = 3
    assert conv["hamming"]["matrix"][0][1] == pytest.approx(0.5)
    assert fc["jaccard"]["matrix"][0][1] == pytest.approx(0.5)  # a against all-kept: 2 of 4
    assert result["overall"]["jaccard"]["matrix"][1][0] == pytest.approx(1 - 3 / 7)  # pooled: (1 + 2) / (3 + 4)
    assert result["overall"]["hamming"]["mean"] == pytest.approx(4 / 8)
    assert mask_distance([{}, {}]) is None
    slim = [{"conv.weight": a.view(2, 2), "fc.weight": a}, {"conv.weight": b.view(2, 2), "fc.weight": b[:2]}]
    assert set(mask_distance(slim)["layers"]) == {"conv.weight"}  # slim members' fc positions do not correspond
    assert mask_distance([{"fc.weight": a}, {"fc.weight": b[:2]}]) is None

    logits = torch.log(torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]]))
    diversity = prediction_diversity(logits)
    kl = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert diversity["kl"]["matrix"][0][1] == pytest.approx(kl)
    assert diversity["disagreement"]["mean"] == 0.0  # argmax of [.5, .5] is class 0, like [.9, .1]


# ----- the CLI end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, EnsembleModel]:
    root = tmp_path_factory.mktemp("evaluate")
    model = save_tiny_ensemble(root / "model")
    images = random_images(40)
    data = write_dataset(root / "data", {"test": (images, model_labels(model, images, flip=0.3))}, LABELS)
    return root / "model", data, model


def test_evaluate_cli(tiny, tmp_path, capsys):
    model_dir, data_dir, model = tiny
    out = tmp_path / "results.json"
    argv = ["evaluate", str(model_dir), "--dataset", str(data_dir), "--ood-dataset", "sklearn:digits"]
    argv += [
        "--max-samples",
        "50",
        "--corruptions",
        "contrast",
        "--output",
        str(out),
        "--plots",
        str(tmp_path / "plots"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ECE over 15 equal-width bins" in printed and "sklearn:digits (50 images)" in printed
    results = json.loads(out.read_text())
    assert not (model_dir / EVAL_RESULTS_NAME).exists()  # a subset sent to --output leaves the folder alone
    assert results["num_images"] == 40 and results["ece_bins"] == 15 and len(results["members"]) == 3
    assert "in-distribution is the positive class" in results["conventions"]["ood"]
    for row in [results["ensemble"], *results["members"]]:
        assert {"accuracy", "nll", "brier", "ece"} <= row.keys()
    for score in ("msp", "entropy", "mutual_information"):
        assert set(results["ood"]["sklearn:digits"][score]) == {"auroc", "aupr", "fpr_at_95_tpr"}
    assert set(results["corruptions"]["per_corruption"]["contrast"]["severities"]) == {"1", "2", "3", "4", "5"}
    assert results["diversity"]["mask_distance"]["overall"]["jaccard"]["mean"] > 0.5  # independent 20 % masks
    assert results["runtime"]["images_per_process"] == [40]
    for name in PLOT_NAMES.values():
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same numbers through the user-facing path: PIL images -> model.predict
    ds = datasets.load_dataset(str(data_dir), split="test")
    predictions = model.predict(list(ds["image"][:]))
    labels = torch.tensor(ds["label"][:])
    expected = classification_metrics(torch.from_numpy(predictions.probs), labels)
    for key in ("accuracy", "nll", "brier", "ece"):
        assert results["ensemble"][key] == pytest.approx(expected[key], abs=1e-5)
    assert 0.5 < results["ensemble"]["accuracy"] < 0.95  # labels are the model's own, 30 % flipped


def test_labels_are_mapped_by_name(tiny, tmp_path):
    _, _, model = tiny
    images = random_images(6)
    shuffled = ["cross", "circle", "square"]
    data = write_dataset(tmp_path / "shuffled", {"test": (images, [0, 1, 2, 0, 1, 2])}, shuffled)
    split = load_eval_split(str(data), model.config)
    assert split.labels.tolist() == [2, 0, 1, 2, 0, 1]


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    _, _, model = tiny
    foreign = write_dataset(tmp_path / "foreign", {"test": (random_images(3), [0, 1, 0])}, ["circle", "star"])
    with pytest.raises(DatasetError, match=r"lacks \['cross', 'square'\].*has \['star'\]"):
        load_eval_split(str(foreign), model.config)
    with pytest.raises(DatasetError, match="split 'validation'"):
        load_eval_split(str(foreign), model.config, split="validation")
    empty = write_dataset(tmp_path / "empty", {"train": (random_images(2), [0, 1]), "test": ([], [])}, LABELS)
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        load_eval_split(str(empty), model.config)
    bands = datasets.Array3D((12, 12, 5), "uint8")
    five = write_dataset(tmp_path / "five", {"test": (random_images(2, channels=5), [0, 1])}, LABELS, image=bands)
    with pytest.raises(DatasetError, match="5 channels, which cannot be converted"):
        load_eval_split(str(five), model.config)
    assert main(["evaluate", str(tiny[0]), "--dataset", str(foreign)]) == 2
    assert main(["evaluate", str(tiny[0]), "--dataset", str(foreign), "--corruptions", "fog"]) == 2


def test_convertible_images_are_converted(tiny, tmp_path):
    _, _, model = tiny
    rgba = [Image.fromarray(image, "RGBA") for image in random_images(3, size=16, channels=4)]
    data = write_dataset(tmp_path / "rgba", {"test": (rgba, [0, 1, 2])}, LABELS)
    split = load_eval_split(str(data), model.config)  # 16x16 RGBA -> the model's 12x12 grayscale
    assert split.images.shape == (3, 1, 12, 12) and split.images.dtype == torch.uint8
    identity = {**model.config.pretrained_cfg, "mean": [0.0], "std": [1.0]}
    model_view = torch.from_numpy(preprocess(rgba, identity) * 255).round()
    torch.testing.assert_close(split.images.float(), model_view)  # what predict() would feed the model
