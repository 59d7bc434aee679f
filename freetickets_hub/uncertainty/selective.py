"""Selective prediction with guarantees: abstain at a target error rate, conformal prediction sets (numpy only).

**Abstention threshold** (Learn-then-Test, Angelopoulos, Bates, Candès, Jordan & Lei, 2021,
arXiv 2110.01052). Every image gets an uncertainty ``u`` (``1 - confidence``, the entropy or the
mutual information); the model answers when ``u <= tau``. For each ``tau`` of a grid fixed before
the data is seen (:func:`threshold_grid`) the null hypothesis "the error rate of the answered
images exceeds R" is tested with the exact binomial tail p-value ``P(Bin(n_tau, R) <= k_tau)``,
where ``n_tau`` images of the calibration split are answered and ``k_tau`` of them are wrong (the
answered images are i.i.d. draws of the answered population, so given ``n_tau`` their errors are
binomial with the population's selective risk; LTT's binomial p-value for a conditional risk).
The hypotheses are tested from the most to the least certain threshold with the *fallback
procedure* (Wiens, 2003; a graphical FWER procedure, Bretz et al., 2009): each grid point holds
``delta / G`` of the level and a rejected point passes its level on to the next. It controls the
family-wise error at ``delta``, so with probability at least ``1 - delta`` over the calibration
draw every rejected threshold has selective risk ``<= R``; the one answering the most images is
kept. Fixed-sequence testing is the special case with all of ``delta`` on the first point; it
stops at the first point it cannot reject, and the most certain thresholds answer too few
calibration images to reject anything (``(1 - R)^n > delta`` for ``n < log(delta) / log(1 - R)``),
so it refuses models that the fallback procedure serves. No threshold rejected: the fit is refused.

**Prediction sets** (split conformal, Vovk et al., 2005; LAC: Sadinle, Lei & Wasserman, 2019;
APS: Romano, Sesia & Candès, 2020). The conformity score of an image is ``1 - p(true label)``
(LAC) or the probability mass of the labels ranked at or above the true one (APS, the
non-randomised variant that includes the label crossing the quantile). The quantile is the
``ceil((n + 1)(1 - alpha))``-th smallest of the n calibration scores, so a new exchangeable image's
set holds its true label with probability at least ``1 - alpha``.

Both guarantees hold for data exchangeable with the calibration split; under distribution shift
they do not. :func:`decide` is the one function every engine (``EnsembleModel``, ``OnnxEnsemble``,
``handler.py``, the service) applies to the stored numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from freetickets_hub.artifact.config import CONFORMAL_SCORES, SELECTIVE_SCORES, SelectiveConfig
from freetickets_hub.errors import FreeTicketsError

__all__ = [
    "CONFORMAL_SCORES",
    "GRID_POINTS",
    "SELECTIVE_SCORES",
    "ConformalFit",
    "InfeasibleRiskError",
    "ThresholdFit",
    "answered",
    "binomial_cdf",
    "conformal_quantile",
    "conformal_scores",
    "decide",
    "evaluate_rule",
    "fallback_rejections",
    "fit_conformal",
    "fit_threshold",
    "prediction_sets",
    "threshold_grid",
    "uncertainty",
]

GRID_POINTS = 100  # thresholds tested, log-spaced over 4 decades of the score's range
_GRID_DECADES = 4


class InfeasibleRiskError(FreeTicketsError, ValueError):
    """No threshold can be shown to keep the selective risk at or below the target on this data."""


@dataclass
class ThresholdFit:
    """The fitted abstention rule and what it reached on the calibration split."""

    score: str
    threshold: float  # answer when confidence >= threshold (entropy, mutual information: <= threshold)
    target_risk: float
    delta: float
    num_images: int
    coverage: float  # share of the calibration images answered
    risk: float  # error rate of the answered calibration images
    p_value: float  # of "risk > target" at the chosen threshold


@dataclass
class ConformalFit:
    """The fitted conformal quantile and the calibration split's own set sizes."""

    score: str
    alpha: float
    quantile: float
    num_images: int
    mean_set_size: float


def uncertainty(outputs: Mapping[str, np.ndarray], score: str) -> np.ndarray:
    """``(B,)`` uncertainty by ``score``, lower meaning more certain: 1 - confidence, entropy or mutual information."""
    if score not in SELECTIVE_SCORES:
        raise ValueError(f"score must be one of {SELECTIVE_SCORES}, got {score!r}")
    if score == "confidence":
        return 1.0 - np.asarray(outputs["probs"], dtype=np.float64).max(-1)
    return np.asarray(outputs[score], dtype=np.float64)


def threshold_grid(score: str, num_classes: int, points: int = GRID_POINTS) -> np.ndarray:
    """The thresholds on :func:`uncertainty` that are tested, ascending; fixed by the score and K alone.

    Log-spaced from ``u_max / 10**4`` to ``u_max`` (which answers every image): ``u_max`` is
    ``1 - 1/K`` for the confidence and ``log K`` for the entropy and the mutual information.
    """
    if num_classes < 2:
        raise ValueError(f"selective prediction needs at least 2 classes, got {num_classes}")
    top = 1.0 - 1.0 / num_classes if score == "confidence" else math.log(num_classes)
    return top * np.logspace(-_GRID_DECADES, 0, points)


def binomial_cdf(k: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """``P(Bin(n, p) <= k)`` elementwise, exactly (a sum of pmf terms in log space); 1 where ``n == 0``."""
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(int(n.max(initial=0)), 1) + 1)))])
    out = np.ones(k.shape, dtype=np.float64)
    for index in np.ndindex(k.shape):
        trials, successes = int(n[index]), min(int(k[index]), int(n[index]))
        if successes < 0:
            out[index] = 0.0
            continue
        i = np.arange(successes + 1)
        log_pmf = (
            log_factorial[trials] - log_factorial[i] - log_factorial[trials - i]
            + i * math.log(p) + (trials - i) * math.log1p(-p)
        )  # fmt: skip
        peak = log_pmf.max()
        out[index] = min(1.0, math.exp(peak) * np.exp(log_pmf - peak).sum())
    return out


def fallback_rejections(p_values: np.ndarray, delta: float, weights: np.ndarray | None = None) -> np.ndarray:
    """The fallback procedure: which hypotheses, tested in order, are rejected with FWER <= ``delta``.

    Hypothesis j is tested at ``delta * w_j`` plus the level of hypothesis j - 1 if that one was
    rejected. ``weights`` (non-negative, summing to at most 1) default to uniform; ``[1, 0, ...]``
    is fixed-sequence testing.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    weights = np.full(len(p_values), 1.0 / len(p_values)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != p_values.shape or (weights < 0).any() or weights.sum() > 1.0 + 1e-12:
        raise ValueError("weights must be non-negative, one per p-value, and sum to at most 1")
    rejected = np.zeros(len(p_values), dtype=bool)
    carried = 0.0
    for j, p in enumerate(p_values):
        level = delta * weights[j] + carried
        rejected[j] = p <= level
        carried = level if rejected[j] else 0.0
    return rejected


def fit_threshold(
    outputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    score: str,
    target_risk: float,
    delta: float,
) -> ThresholdFit:
    """Fit the abstention threshold with risk ``<= target_risk`` with probability ``>= 1 - delta`` (module doc).

    Args:
        outputs: the ensemble's calibrated outputs on held-out images (``probs`` ``(N, K)``, and
            ``entropy`` / ``mutual_information`` ``(N,)`` for those scores).
        labels: ``(N,)`` true class indices.
        score: ``confidence``, ``entropy`` or ``mutual_information``.
        target_risk: R, the largest acceptable error rate among answered images, in (0, 1).
        delta: the probability the guarantee may fail, in (0, 1).

    Raises:
        InfeasibleRiskError: no threshold of the grid passes the test (nothing to store).

    Example:
        >>> probs = np.tile([[0.999, 0.001]], (400, 1)); labels = np.zeros(400, dtype=int)
        >>> fit = fit_threshold({"probs": probs}, labels, score="confidence", target_risk=0.05, delta=0.1)
        >>> fit.coverage, fit.risk
        (1.0, 0.0)
    """
    if not 0.0 < target_risk < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"target_risk and delta must be in (0, 1), got {target_risk} and {delta}")
    probs = np.asarray(outputs["probs"], dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels):
        raise ValueError(f"expected probs (N, K) and labels (N,) with N > 0, got {probs.shape} and {labels.shape}")
    errors = probs.argmax(-1) != labels
    grid = threshold_grid(score, probs.shape[1])
    thresholds = 1.0 - grid if score == "confidence" else grid  # in the score's own units, as stored
    answers = _answers(_score_values(outputs, score), score, thresholds[:, None])  # (G, N), as decide() answers
    answered_count = answers.sum(1)
    error_count = (answers & errors).sum(1)
    p_values = binomial_cdf(error_count, answered_count, target_risk)
    rejected = fallback_rejections(p_values, delta)
    if not rejected.any():
        best = int(np.argmin(p_values))
        raise InfeasibleRiskError(
            f"no {score} threshold keeps the error rate of the answered images at or below {target_risk} with "
            f"probability {1 - delta} on these {len(labels)} images (the most convincing one answers "
            f"{answered_count[best]} with {error_count[best]} errors, p-value {p_values[best]:.3g}); use more "
            "held-out images, a larger --target-risk or --delta, or another --score"
        )
    j = int(np.flatnonzero(rejected)[-1])  # the most permissive threshold shown safe: most coverage
    return ThresholdFit(
        score=score,
        threshold=float(thresholds[j]),
        target_risk=target_risk,
        delta=delta,
        num_images=len(labels),
        coverage=float(answered_count[j] / len(labels)),
        risk=float(error_count[j] / answered_count[j]),
        p_value=float(p_values[j]),
    )


def conformal_scores(probs: np.ndarray, labels: np.ndarray, score: str) -> np.ndarray:
    """``(N,)`` conformity scores of the true labels: LAC ``1 - p_y``; APS the mass ranked at or above y."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(probs))
    if score == "lac":
        return 1.0 - probs[rows, labels]
    if score == "aps":
        return _aps_cumulative(probs)[rows, labels]
    raise ValueError(f"conformal score must be one of {CONFORMAL_SCORES}, got {score!r}")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score: split conformal's finite-sample quantile.

    Raises:
        ValueError: ``alpha`` is too small for n scores (``ceil((n + 1)(1 - alpha)) > n``).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # the tolerance keeps (n+1)(1-alpha) = 9.000000001 at 9
    if not 0.0 < alpha < 1.0 or rank > n:
        raise ValueError(
            f"conformal alpha {alpha} needs at least {math.ceil(1 / alpha) - 1 if 0 < alpha < 1 else '?'} held-out "
            f"images, got {n}"
        )
    return float(scores[max(rank, 1) - 1])


def fit_conformal(probs: np.ndarray, labels: np.ndarray, *, alpha: float, score: str = "lac") -> ConformalFit:
    """Split-conformal prediction sets with marginal coverage ``>= 1 - alpha`` on exchangeable data.

    Example:
        >>> probs = np.array([[0.7, 0.2, 0.1]] * 19 + [[0.1, 0.2, 0.7]])
        >>> fit = fit_conformal(probs, np.zeros(20, dtype=int), alpha=0.1)  # rank ceil(21 * 0.9) = 19 of 20
        >>> round(fit.quantile, 2)
        0.3
    """
    quantile = conformal_quantile(conformal_scores(probs, labels, score), alpha)
    sizes = [len(s) for s in prediction_sets(probs, quantile, score)]
    return ConformalFit(score, alpha, quantile, len(labels), float(np.mean(sizes)))


def prediction_sets(probs: np.ndarray, quantile: float, score: str) -> list[list[int]]:
    """Per image, the label ids whose conformity score is at most ``quantile`` (most probable first).

    APS also keeps the label whose cumulative mass first crosses the quantile, so every set is
    non-empty; a LAC set is empty when no label reaches probability ``1 - quantile``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=-1, kind="stable")
    if score == "lac":
        keep = (1.0 - probs) <= quantile
    elif score == "aps":
        cumulative = _aps_cumulative(probs)
        before = cumulative - probs  # the mass ranked strictly above each label
        keep = (cumulative <= quantile) | (before < quantile)
    else:
        raise ValueError(f"conformal score must be one of {CONFORMAL_SCORES}, got {score!r}")
    return [[int(k) for k in row if keep[i, k]] for i, row in enumerate(order)]


def answered(outputs: Mapping[str, np.ndarray], selective: SelectiveConfig) -> np.ndarray:
    """``(B,)`` bool: the images the stored threshold answers (``~abstain``)."""
    return _answers(_score_values(outputs, selective.score), selective.score, selective.threshold)


def decide(
    outputs: Mapping[str, np.ndarray], selective: SelectiveConfig | None
) -> tuple[np.ndarray | None, list[list[int]] | None]:
    """``abstain`` ``(B,)`` bool and the prediction sets, from the stored rule (None for a part not stored).

    The one decision every engine makes, from ``probs`` and the uncertainty outputs alone. Engines
    agree on their outputs to about 1e-6, so an image that close to the threshold (or the
    conformal quantile) may be decided differently by PyTorch and ONNX Runtime.
    """
    if selective is None:
        return None, None
    abstain = ~answered(outputs, selective) if selective.score is not None else None
    sets = (
        prediction_sets(outputs["probs"], selective.conformal_quantile, selective.conformal_score)
        if selective.conformal_score is not None
        else None
    )
    return abstain, sets


def evaluate_rule(outputs: Mapping[str, np.ndarray], labels: np.ndarray, selective: SelectiveConfig) -> dict:
    """How the stored rule does on labelled images: selective risk and coverage, set coverage and size.

    Returns:
        ``threshold`` (when stored): ``score``, ``threshold``, ``target_risk``, ``delta``, ``coverage``,
        ``risk`` (error rate of the answered images; None when none is answered), ``answered``,
        ``risk_within_target``; ``conformal`` (when stored): ``score``, ``alpha``, ``quantile``,
        ``coverage`` (share of sets holding the true label), ``mean_set_size``, ``empty_sets``.
    """
    labels = np.asarray(labels)
    abstain, sets = decide(outputs, selective)
    result: dict = {"n_calibration": selective.n, "fit_on": selective.fit_on}
    if abstain is not None:
        errors = np.asarray(outputs["probs"]).argmax(-1) != labels
        kept = ~abstain
        risk = float(errors[kept].mean()) if kept.any() else None
        result["threshold"] = {
            "score": selective.score,
            "threshold": selective.threshold,
            "target_risk": selective.target_risk,
            "delta": selective.delta,
            "answered": int(kept.sum()),
            "coverage": float(kept.mean()),
            "risk": risk,
            "risk_within_target": risk is None or risk <= selective.target_risk,
        }
    if sets is not None:
        sizes = np.array([len(s) for s in sets])
        result["conformal"] = {
            "score": selective.conformal_score,
            "alpha": selective.conformal_alpha,
            "quantile": selective.conformal_quantile,
            "coverage": float(np.mean([int(y) in s for y, s in zip(labels, sets, strict=True)])),
            "mean_set_size": float(sizes.mean()),
            "empty_sets": int((sizes == 0).sum()),
        }
    return result


def _score_values(outputs: Mapping[str, np.ndarray], score: str) -> np.ndarray:
    """The score itself: the confidence (max probability), the entropy or the mutual information."""
    if score == "confidence":
        return np.asarray(outputs["probs"], dtype=np.float64).max(-1)
    return uncertainty(outputs, score)


def _answers(values: np.ndarray, score: str, threshold: float | np.ndarray) -> np.ndarray:
    """Answer when the confidence reaches the threshold, or the entropy / mutual information stays below it."""
    return values >= threshold if score == "confidence" else values <= threshold


def _aps_cumulative(probs: np.ndarray) -> np.ndarray:
    """``(N, K)``: for each label, the probability mass of the labels ranked at or above it (stable order)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1).cumsum(-1)
    cumulative = np.empty_like(probs)
    np.put_along_axis(cumulative, order, ranked, axis=-1)
    return cumulative
