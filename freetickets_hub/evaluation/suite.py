"""The evaluation suite: quality, calibration, selective prediction, OOD detection, robustness, diversity.

:func:`evaluate` returns one JSON-ready dict (the format of ``eval_results.json``)::

    {"dataset", "split", "num_images", "ece_bins": 15, "temperature", "conventions": {...},
     "ensemble": {"accuracy", "nll", "brier", "ece"}, "members": [{"member": 0, ...}, ...],
     "reliability": {...}, "selective": {"aurc", "coverage", "risk", "risk_at_coverage", "stored_rule"?, ...},
     "ood": {name: {"split", "num_images", "kind", "classes"?, "msp": {"auroc", "aupr", "fpr_at_95_tpr"},
                    "entropy", "mutual_information", "at_temperature_1": {"msp", "entropy", "mutual_information"}}},
     "ood_summary": {kind: {"sets": [name, ...], "auroc": {score: mean}, "auroc_at_temperature_1": {score: mean}}},
     "corruptions": {"mean": {...}, "per_corruption": {name: {"mean": {...}, "severities": {"1": {...}}}}, ...},
     "diversity": {"disagreement", "kl", "mask_distance"}, "runtime": {...}}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from freetickets_hub.data import EvalSplit
from freetickets_hub.errors import DatasetError
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.metrics import (
    ECE_BINS,
    classification_metrics,
    detection_metrics,
    reliability_bins,
    risk_coverage,
)
from freetickets_hub.uncertainty.outputs import EnsembleOutput, combine_member_logits
from freetickets_hub.uncertainty.selective import evaluate_rule

from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionTransform
from .diversity import mask_distance, prediction_diversity
from .inference import create_accelerator, run_inference
from .ood_suite import KINDS, ood_kind

__all__ = ["CONVENTIONS", "OOD_SCORES", "evaluate"]

RISK_AT_COVERAGE = ("0.80", "0.95")  # coverage levels whose risk is reported
# OOD scores, each oriented so that higher means "looks more in-distribution"
OOD_SCORES = ("msp", "entropy", "mutual_information")
CONVENTIONS = {
    "ece": f"expected calibration error of the top-1 confidence, {ECE_BINS} equal-width bins, L1 (torchmetrics)",
    "temperature": "the model's stored calibration temperature is applied to the ensemble and to every member",
    "ood": (
        "in-distribution is the positive class; scores are oriented so that higher means more in-distribution: "
        "msp = max probability, entropy = -(predictive entropy), mutual_information = -(mutual information); "
        "aupr is the area under the precision-recall curve of in-distribution detection; fpr_at_95_tpr is the "
        "share of OOD images accepted when 95% of in-distribution images are; scores use the stored temperature, "
        "at_temperature_1 the same scores at T = 1 (before calibration). kind: far = another dataset or generated "
        "images (synthetic:*), shifted = the evaluation split's own images transformed (shift:*), near = the "
        "evaluation dataset's classes the model was not trained on (held-out, listed in classes)"
    ),
    "ood_summary": "per OOD kind, the mean AUROC of each score over that kind's sets (unweighted by set size)",
    "selective": (
        "risk = error rate of the predictions accepted by max probability; aurc = mean risk over coverage k/N; "
        "stored_rule = the model's ensemble.selective rule on this split: coverage = share answered, risk = error "
        "rate of those; conformal coverage = share of prediction sets holding the true label"
    ),
    "corruptions": "ensemble metrics on corrupted copies of the evaluation split; means are over severities 1-5",
}


def evaluate(
    model: EnsembleModel,
    data: EvalSplit,
    *,
    ood: Sequence[EvalSplit] = (),
    corruptions: Sequence[str] = (),
    accelerator: Any | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole suite on a labelled split; every process of a distributed launch must call it.

    Args:
        model: the ensemble, with its stored temperature.
        data: the labelled in-distribution split (``load_eval_split``).
        ood: out-of-distribution splits (their labels are ignored).
        corruptions: names from ``CORRUPTIONS`` to run at severities 1–5 (empty: skip).
        accelerator: an ``accelerate.Accelerator`` (created if None).
        batch_size: images per forward pass on each process.
        seed: seed of the corruptions' noise.

    Example:
        >>> from freetickets_hub import EnsembleConfig
        >>> cfg = EnsembleConfig("cifar_wrn10_2", 2, model_args={"in_chans": 1},
        ...                      pretrained_cfg={"input_size": [1, 8, 8]}, ensemble={"num_members": 2})
        >>> split = EvalSplit("toy", "test", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
        >>> evaluate(EnsembleModel(cfg), split)["ensemble"]["accuracy"]
        0.5
    """
    if data.labels is None:
        raise DatasetError(f"{data.description} has no labels to evaluate against")
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {sorted(CORRUPTIONS)}")
    accelerator = accelerator or create_accelerator()
    start = time.perf_counter()
    temperature = model.temperature
    clean = run_inference(model, data.images, accelerator, batch_size=batch_size, desc=f"evaluate {data.source}")
    output = combine_member_logits(clean.member_logits, temperature)
    labels = data.labels
    results: dict[str, Any] = {
        "dataset": data.source,
        "split": data.split,
        "num_images": len(data),
        "ece_bins": ECE_BINS,
        "temperature": temperature,
        "calibration": asdict(calibration) if (calibration := model.config.ensemble.calibration) else None,
        "conventions": CONVENTIONS,
        "ensemble": classification_metrics(output.probs, labels),
        "members": [
            {"member": index, **classification_metrics(probs, labels)}
            for index, probs in enumerate(output.member_probs)
        ],
        "reliability": reliability_bins(output.probs, labels),
        "selective": _selective_metrics(model, output, labels),
    }
    results["ensemble"]["mean_disagreement"] = output.disagreement.mean().item()
    results["ood"] = {}
    uncalibrated = combine_member_logits(clean.member_logits, 1.0)
    for split in ood:
        result = run_inference(model, split.images, accelerator, batch_size=batch_size, desc=f"OOD {split.source}")
        results["ood"][split.source] = {
            **_ood_metrics(output, combine_member_logits(result.member_logits, temperature), split),
            "at_temperature_1": _ood_metrics(uncalibrated, combine_member_logits(result.member_logits, 1.0)),
        }
    results["ood_summary"] = _ood_summary(results["ood"])
    if corruptions:
        results["corruptions"] = _corruption_metrics(
            model, data.images, labels, corruptions, accelerator, batch_size, seed
        )
    results["diversity"] = {
        **prediction_diversity(clean.member_logits, temperature),
        "mask_distance": mask_distance(model.masks),
    }
    results["runtime"] = {
        "num_processes": accelerator.num_processes,
        "images_per_process": clean.images_per_process,
        "device": str(accelerator.device),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return results


def _selective_metrics(model: EnsembleModel, output: EnsembleOutput, labels: torch.Tensor) -> dict[str, Any]:
    """The max-probability risk–coverage curve (AURC, risk at 80 % and 95 % coverage) and the stored rule's results."""
    curve = risk_coverage(output.probs, labels)
    at = {f"{level:.2f}": r for level, r in zip(curve["coverage"], curve["risk"], strict=True)}
    curve["risk_at_coverage"] = {level: at[level] for level in RISK_AT_COVERAGE}
    rule = model.config.ensemble.selective
    if rule is not None:
        keys = ("probs", "entropy", "mutual_information")
        outputs = {key: getattr(output, key).double().cpu().numpy() for key in keys}
        curve["stored_rule"] = evaluate_rule(outputs, labels.cpu().numpy(), rule)
    return curve


def _ood_scores(output: EnsembleOutput) -> dict[str, torch.Tensor]:
    return {
        "msp": output.probs.max(-1).values,
        "entropy": -output.entropy,
        "mutual_information": -output.mutual_information,
    }


def _ood_metrics(inside: EnsembleOutput, outside: EnsembleOutput, split: EvalSplit | None = None) -> dict[str, Any]:
    """Detection metrics of every score; with ``split``, also what the set is (split, size, kind, classes)."""
    in_scores, out_scores = _ood_scores(inside), _ood_scores(outside)
    metrics = {name: detection_metrics(in_scores[name], out_scores[name]) for name in OOD_SCORES}
    if split is None:
        return metrics
    described = {"split": split.split, "num_images": len(split), "kind": ood_kind(split.source)}
    if split.unknown_classes:
        described["classes"] = list(split.unknown_classes)
    return {**described, **metrics}


def _ood_summary(ood: dict[str, Any]) -> dict[str, Any]:
    """Per kind, the sets and the mean AUROC of each score over them, after and before calibration."""
    summary: dict[str, Any] = {}
    for kind in KINDS:
        sets = [name for name, result in ood.items() if result["kind"] == kind]
        if not sets:
            continue
        summary[kind] = {
            "sets": sets,
            "auroc": {s: sum(ood[n][s]["auroc"] for n in sets) / len(sets) for s in OOD_SCORES},
            "auroc_at_temperature_1": {
                s: sum(ood[n]["at_temperature_1"][s]["auroc"] for n in sets) / len(sets) for s in OOD_SCORES
            },
        }
    return summary


def _corruption_metrics(
    model: EnsembleModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    accelerator: Any,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    keys = ("accuracy", "nll", "ece")
    per_corruption = {}
    for name in names:
        severities = {}
        for severity in SEVERITIES:
            transform = CorruptionTransform(name, severity, seed)
            result = run_inference(
                model, images, accelerator, batch_size=batch_size, transform=transform, desc=f"{name} s{severity}"
            )
            metrics = classification_metrics(
                combine_member_logits(result.member_logits, model.temperature).probs, labels
            )
            severities[str(severity)] = {k: metrics[k] for k in keys}
        per_corruption[name] = {"mean": _mean(severities.values(), keys), "severities": severities}
    return {
        "severities": list(SEVERITIES),
        "seed": seed,
        "parameters": {name: list(CORRUPTIONS[name][1]) for name in names},
        "mean": _mean([c["mean"] for c in per_corruption.values()], keys),
        "per_corruption": per_corruption,
    }


def _mean(rows: Any, keys: Sequence[str]) -> dict[str, float]:
    rows = list(rows)
    return {k: sum(row[k] for row in rows) / len(rows) for k in keys}
