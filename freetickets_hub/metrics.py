"""Classification metrics on probabilities: accuracy, NLL, Brier score and ECE (torchmetrics).

ECE uses 15 equal-width confidence bins and the L1 norm, torchmetrics' ``multiclass_calibration_error``.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = ["ECE_BINS", "classification_metrics"]

ECE_BINS = 15


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE of ``probs`` ``(N, K)`` against integer ``labels`` ``(N,)``."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
    probs = probs.double()
    num_classes = probs.shape[1]
    picked = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()
    return {
        "accuracy": (probs.argmax(1) == labels).double().mean().item(),
        "nll": -picked.clamp_min(torch.finfo(torch.float64).tiny).log().mean().item(),
        "brier": ((probs - one_hot) ** 2).sum(1).mean().item(),
        "ece": multiclass_calibration_error(probs.float(), labels, num_classes, n_bins=ECE_BINS, norm="l1").item(),
    }
