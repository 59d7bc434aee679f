"""Bootstrap intervals for OOD detection: AUROC and FPR@95 under resampled test images, paired across runs.

Runs scored on the same images share the bootstrap draws (one weight vector per draw for the
in-distribution images and one per OOD set), so the interval of a difference between two methods, or
of a mean over seeds, is read from the same draws. A draw resamples the in-distribution and the OOD
images independently, with replacement, as multinomial counts; the metrics are computed from counts
per distinct score value, so one draw costs O(distinct values) after a single sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

__all__ = ["Draws", "bootstrap_detection", "interval", "separated"]

TPR_LEVEL = 0.95
CHUNK = 200  # draws per matrix product (bounds memory at about CHUNK x distinct values x 8 bytes x 4)


@dataclass(frozen=True)
class Draws:
    """Bootstrap counts, ``(draws, n)`` for the in-distribution images and for one OOD set."""

    inside: np.ndarray
    outside: np.ndarray

    @classmethod
    def make(cls, inside: np.ndarray | int, n_outside: int, draws: int, seed: int) -> Draws:
        """``inside``: counts to reuse (so every OOD set shares the in-distribution draws), or its size."""
        rng = np.random.default_rng(seed)
        if isinstance(inside, int):
            inside = _counts(rng, inside, draws)
        return cls(inside, _counts(rng, n_outside, draws))


def _counts(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    picks = rng.integers(0, n, size=(draws, n))
    return np.stack([np.bincount(row, minlength=n) for row in picks]).astype(np.float64)


def bootstrap_detection(in_scores: np.ndarray, out_scores: np.ndarray, draws: Draws) -> dict[str, np.ndarray]:
    """AUROC and FPR at 95 % TPR on every draw (in-distribution positive, higher score = more in-distribution).

    Ties count one half in AUROC, as in the Mann-Whitney statistic. FPR@95 takes the highest threshold
    that accepts at least 95 % of the (weighted) in-distribution images, as ``detection_metrics`` does.
    """
    values, groups = np.unique(np.concatenate([in_scores, out_scores]), return_inverse=True)
    n_in = len(in_scores)
    one_hot_in = _one_hot(groups[:n_in], len(values))
    one_hot_out = _one_hot(groups[n_in:], len(values))
    auroc, fpr = [], []
    for start in range(0, len(draws.inside), CHUNK):
        inside = np.asarray(one_hot_in.T.dot(draws.inside[start : start + CHUNK].T).T)  # (draws, groups)
        outside = np.asarray(one_hot_out.T.dot(draws.outside[start : start + CHUNK].T).T)
        total_in, total_out = inside.sum(1), outside.sum(1)
        below = np.cumsum(outside, axis=1) - outside
        auroc.append((inside * (below + 0.5 * outside)).sum(1) / (total_in * total_out))
        tail_in = np.cumsum(inside[:, ::-1], axis=1)[:, ::-1] / total_in[:, None]  # share accepted at >= value
        tail_out = np.cumsum(outside[:, ::-1], axis=1)[:, ::-1] / total_out[:, None]
        threshold = (tail_in >= TPR_LEVEL).sum(1) - 1  # the highest group still accepting 95 %
        fpr.append(tail_out[np.arange(len(threshold)), threshold])
    return {"auroc": np.concatenate(auroc), "fpr_at_95_tpr": np.concatenate(fpr)}


def _one_hot(groups: np.ndarray, size: int) -> sparse.csr_matrix:
    return sparse.csr_matrix((np.ones(len(groups)), (np.arange(len(groups)), groups)), shape=(len(groups), size))


def interval(draws: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval of bootstrap draws."""
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))]


def separated(difference_draws: np.ndarray, per_seed: Sequence[float]) -> bool:
    """A difference counts when its 95 % interval excludes 0 and every seed's point difference has its sign."""
    low, high = interval(difference_draws)
    if low <= 0 <= high:
        return False
    sign = np.sign(high)
    return all(np.sign(d) == sign for d in per_seed)
