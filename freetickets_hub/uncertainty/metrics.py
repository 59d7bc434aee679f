"""Metrics on predictions: classification quality, calibration bins, selective prediction, OOD detection.

torchmetrics computes ECE (15 equal-width confidence bins, L1 norm), AUROC, average precision and
the ROC curve; what it lacks (NLL, Brier, the risk–coverage curve, FPR at 95 % TPR) is a few lines here.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
    multiclass_calibration_error,
)

__all__ = [
    "ECE_BINS",
    "RISK_COVERAGE_POINTS",
    "classification_metrics",
    "detection_metrics",
    "reliability_bins",
    "risk_coverage",
]

ECE_BINS = 15
RISK_COVERAGE_POINTS = 100  # coverage levels kept in reports: 0.01, 0.02, ..., 1.00


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE of ``probs`` ``(N, K)`` against integer ``labels`` ``(N,)``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(classification_metrics(probs, torch.tensor([0, 0]))["accuracy"], 2)
        0.5
    """
    _check_predictions(probs, labels)
    probs = probs.double()
    num_classes = probs.shape[1]
    picked = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()
    # torchmetrics applies a softmax to anything outside [0, 1]: keep float32 rounding (1.0000001) inside
    calibration_probs = probs.float().clamp(0.0, 1.0)
    return {
        "accuracy": (probs.argmax(1) == labels).double().mean().item(),
        "nll": -picked.clamp_min(torch.finfo(torch.float64).tiny).log().mean().item(),
        "brier": ((probs - one_hot) ** 2).sum(1).mean().item(),
        "ece": multiclass_calibration_error(calibration_probs, labels, num_classes, n_bins=ECE_BINS, norm="l1").item(),
    }


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy of the top-1 prediction, for a reliability diagram.

    Bins are equal-width over [0, 1], left-closed like torchmetrics' (the last one also holds 1.0).
    """
    _check_predictions(probs, labels)
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges[1:-1], right=True)).clamp_max(n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {
        "edges": edges.tolist(),
        "count": count.long().tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (correct_sum / safe).tolist(),
    }


def risk_coverage(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | list[float] | str]:
    """Selective prediction by maximum softmax probability: the risk–coverage curve and its area (AURC).

    Predictions are accepted from most to least confident; at coverage k/N the risk is the error rate
    of the k accepted ones. AURC is the mean risk over k = 1..N (Geifman et al., 2019).

    Returns:
        ``aurc``, the optimal AURC an oracle ranking would reach (``aurc_optimal``), and the curve at
        coverage 0.01, 0.02, ..., 1.00 (``coverage``, ``risk``).
    """
    _check_predictions(probs, labels)
    confidence, predicted = probs.double().max(1)
    errors = (predicted != labels).double()
    order = torch.argsort(confidence, descending=True, stable=True)
    accepted = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    risk = errors[order].cumsum(0) / accepted  # (N,) risk when the k most confident are accepted
    num_errors = errors.sum()
    oracle = (accepted - (len(labels) - num_errors)).clamp_min(0) / accepted  # errors ranked last
    levels = torch.arange(1, RISK_COVERAGE_POINTS + 1, dtype=torch.float64) / RISK_COVERAGE_POINTS
    keep = (levels * len(labels)).ceil().long().clamp(1, len(labels)) - 1
    return {
        "score": "msp",
        "aurc": risk.mean().item(),
        "aurc_optimal": oracle.mean().item(),
        "coverage": levels.tolist(),
        "risk": risk[keep].tolist(),
    }


def detection_metrics(in_scores: torch.Tensor, out_scores: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR and FPR at 95 % TPR for telling in-distribution from OOD inputs.

    In-distribution is the positive class; scores must be higher for inputs that look more
    in-distribution (e.g. the maximum softmax probability, or minus the entropy).

    Example:
        >>> detection_metrics(torch.tensor([0.9, 0.8]), torch.tensor([0.3, 0.85]))["auroc"]
        0.75
    """
    if in_scores.dim() != 1 or out_scores.dim() != 1 or not len(in_scores) or not len(out_scores):
        raise ValueError(
            f"expected two non-empty 1-D score tensors, got {tuple(in_scores.shape)} and {tuple(out_scores.shape)}"
        )
    scores = torch.cat([in_scores, out_scores]).double()
    target = torch.cat([torch.ones(len(in_scores)), torch.zeros(len(out_scores))]).long()
    # torchmetrics treats scores outside [0, 1] as logits and squashes them with a sigmoid, which can
    # merge distinct large scores; an affine map into [0, 1] keeps their order exactly
    span = (scores.max() - scores.min()).clamp_min(torch.finfo(torch.float64).tiny)
    scores = (scores - scores.min()) / span
    fpr, tpr, _ = binary_roc(scores, target)
    return {
        "auroc": binary_auroc(scores, target).item(),
        "aupr": binary_average_precision(scores, target).item(),
        "fpr_at_95_tpr": fpr[tpr >= 0.95].min().item(),
    }


def _check_predictions(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
