"""Selective prediction statistics: against scipy / MAPIE where they compute the same quantity, and by Monte Carlo.

The Monte Carlo tests draw synthetic calibration sets from a known error model, so the *true*
selective risk of a fitted threshold is known exactly (no test-split noise is mistaken for a
violation of the guarantee), and each one also checks that a wrong method would fail it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from mapie.conformity_scores import APSConformityScore
from mapie.risk_control import control_fwer
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy.special import betainc
from scipy.stats import binom
from sklearn.base import BaseEstimator, ClassifierMixin

from freetickets_hub.artifact.config import EnsembleInfo, SelectiveConfig
from freetickets_hub.errors import ConfigError
from freetickets_hub.uncertainty import selective as sel
from freetickets_hub.uncertainty.predictions import Predictions

SPLITS = 500  # random calibration draws per Monte Carlo test
K = 10


# ----- the same quantity as scipy / MAPIE ------------------------------------------------------------


def test_binomial_cdf_matches_scipy_and_mapies_ltt_p_value():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 3000, 200)
    k = (n * rng.random(200) * 0.2).astype(int)
    for p in (0.01, 0.05, 0.3):
        ours = sel.binomial_cdf(k, n, p)
        np.testing.assert_allclose(ours, binom.cdf(k, n, p), rtol=1e-9, atol=1e-300)
        # MAPIE's LTT p-value for a binary loss: min(Hoeffding, Bentkus) = the binomial tail (Chernoff >= exact)
        mapie = compute_hoeffding_bentkus_p_value(k / n, n.astype(float), p, binary=True)[:, 0]
        exact = k / n * n == k  # where ceil(n * (k / n)) does not round up past k
        np.testing.assert_allclose(ours[exact], mapie[exact], rtol=1e-9)
    assert sel.binomial_cdf(np.array([0]), np.array([0]), 0.1)[0] == 1.0  # nothing answered: no evidence


def test_fallback_with_all_weight_first_is_mapies_fixed_sequence_and_uniform_beats_bonferroni():
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = np.sort(rng.random(30) ** 3)[:: rng.choice([1, -1])] * rng.random()  # runs of small p-values
        p[rng.integers(0, 30)] = rng.random()
        first = np.zeros(30)
        first[0] = 1.0
        ours = np.flatnonzero(sel.fallback_rejections(p, 0.1, first))
        np.testing.assert_array_equal(ours, control_fwer(p, 0.1, "fixed_sequence"))
        uniform = sel.fallback_rejections(p, 0.1)
        assert set(control_fwer(p, 0.1, "bonferroni")) <= set(np.flatnonzero(uniform))


class _GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A 'prefit' classifier whose features are its class probabilities, for MAPIE."""

    def fit(self, X, y):
        self.classes_ = np.arange(X.shape[1])
        return self

    def predict_proba(self, X):
        return X

    def predict(self, X):
        return X.argmax(1)


def _dirichlet_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(5, 0.5), n)
    labels = np.array([rng.choice(5, p=row) for row in probs])
    return probs, labels


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.23])
def test_lac_sets_match_mapie(alpha):
    probs, labels = _dirichlet_problem(400, seed=2)
    mapie = SplitConformalClassifier(
        _GivenProbabilities().fit(probs, labels), confidence_level=1 - alpha, conformity_score="lac", prefit=True
    )
    mapie.conformalize(probs[:150], labels[:150])
    _, expected = mapie.predict_set(probs[150:])
    fit = sel.fit_conformal(probs[:150], labels[:150], alpha=alpha, score="lac")
    ours = np.zeros_like(expected[:, :, 0])
    for i, labels_in in enumerate(sel.prediction_sets(probs[150:], fit.quantile, "lac")):
        ours[i, labels_in] = True
    np.testing.assert_array_equal(ours, expected[:, :, 0])


def test_aps_scores_match_mapies_cumulative_mass_and_sets_are_never_empty():
    probs, labels = _dirichlet_problem(300, seed=3)
    expected, _ = APSConformityScore.get_true_label_cumsum_proba(labels, probs, np.arange(5))
    np.testing.assert_allclose(sel.conformal_scores(probs, labels, "aps"), expected[:, 0], rtol=1e-12)
    # MAPIE's APS calibration is randomised (it subtracts U * p_y); ours is the deterministic variant, so
    # every engine returns the same set for the same image: the sets themselves are checked by coverage below
    fit = sel.fit_conformal(probs, labels, alpha=0.1, score="aps")
    sets = sel.prediction_sets(probs, fit.quantile, "aps")
    assert all(sets) and all(set(s) == set(sorted(s)) for s in sets)
    scores = sel.conformal_scores(probs, labels, "aps")
    assert all(int(y) in s for y, s, c in zip(labels, sets, scores, strict=True) if c <= fit.quantile)


def test_conformal_quantile_is_the_finite_sample_order_statistic():
    scores = np.arange(1, 20) / 20  # n = 19
    assert sel.conformal_quantile(scores, 0.1) == pytest.approx(18 / 20)  # rank ceil(20 * 0.9) = 18
    assert sel.conformal_quantile(scores, 0.5) == pytest.approx(10 / 20)  # rank ceil(20 * 0.5) = 10
    with pytest.raises(ValueError, match="needs at least 19 held-out images, got 9"):
        sel.conformal_quantile(scores[:9], 0.05)  # rank ceil(10 * 0.95) = 10 > 9


# ----- Monte Carlo: the guarantees hold on a known error model ---------------------------------------


def _known_model(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """u = 1 - confidence ~ 0.9 * Beta(0.5, 4); the top-1 is wrong with probability u (K = 10)."""
    u = 0.9 * rng.beta(0.5, 4.0, n)
    probs = np.empty((n, K))
    probs[:, 0] = 1.0 - u
    probs[:, 1:] = (u / (K - 1))[:, None]
    labels = np.where(rng.random(n) < u, 1, 0)  # the top-1 (class 0) is right with probability 1 - u
    return probs, labels


def _true_risk(confidence_threshold: float) -> float:
    """E[u | u <= tau] for u = 0.9 B, B ~ Beta(a, b): 0.9 * a / (a + b) * I_s(a + 1, b) / I_s(a, b), s = tau / 0.9."""
    a, b = 0.5, 4.0
    s = min(1.0, (1.0 - confidence_threshold) / 0.9)
    return 0.9 * a / (a + b) * betainc(a + 1, b, s) / betainc(a, b, s)


def _naive_threshold(probs: np.ndarray, labels: np.ndarray, target_risk: float) -> float:
    """Plug-in: the lowest confidence threshold whose empirical risk on the calibration set is <= R."""
    confidence = probs.max(1)
    order = np.argsort(-confidence)
    risk = np.cumsum(probs.argmax(1)[order] != labels[order]) / np.arange(1, len(labels) + 1)
    ok = np.flatnonzero(risk <= target_risk)
    return float(confidence[order][ok[-1]])


@pytest.mark.parametrize(("target_risk", "delta", "n"), [(0.05, 0.1, 2000), (0.02, 0.2, 4000), (0.08, 0.05, 2000)])
def test_threshold_guarantee_over_random_calibration_splits(target_risk, delta, n):
    rng = np.random.default_rng(4)
    violations, naive_violations, coverages = 0, 0, []
    for _ in range(SPLITS):
        probs, labels = _known_model(n, rng)
        naive_violations += _true_risk(_naive_threshold(probs, labels, target_risk)) > target_risk
        try:
            fit = sel.fit_threshold({"probs": probs}, labels, score="confidence", target_risk=target_risk, delta=delta)
        except sel.InfeasibleRiskError:  # refusing answers nothing: no violation, no coverage
            coverages.append(0.0)
            continue
        violations += _true_risk(fit.threshold) > target_risk
        coverages.append(fit.coverage)
    margin = 3 * math.sqrt(delta * (1 - delta) / SPLITS)  # 3 binomial standard deviations of the violation rate
    assert violations / SPLITS <= delta + margin
    assert naive_violations / SPLITS > 0.3  # the test can fail: the plug-in threshold breaks the bound often
    assert np.mean(coverages) > 0.3 and np.mean(np.array(coverages) == 0) < 0.1  # not bought by answering nothing


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_conformal_coverage_over_random_calibration_splits(score):
    rng = np.random.default_rng(5)
    alpha, n = 0.1, 49  # rank ceil(50 * 0.9) = 45: expected coverage 45 / 50 = 0.9 exactly
    covered, plain = [], []
    for _ in range(SPLITS):
        probs = rng.dirichlet(np.full(K, 0.3), n + 300)
        labels = (probs.cumsum(1) < rng.random((n + 300, 1))).sum(1).clip(max=K - 1)  # y ~ probs: calibrated
        fit = sel.fit_conformal(probs[:n], labels[:n], alpha=alpha, score=score)
        test_sets = sel.prediction_sets(probs[n:], fit.quantile, score)
        covered.append(np.mean([y in s for y, s in zip(labels[n:], test_sets, strict=True)]))
        plain_q = np.quantile(sel.conformal_scores(probs[:n], labels[:n], score), 1 - alpha)
        plain_sets = sel.prediction_sets(probs[n:], plain_q, score)
        plain.append(np.mean([y in s for y, s in zip(labels[n:], plain_sets, strict=True)]))
    margin = 3 * np.std(covered) / math.sqrt(SPLITS)
    assert np.mean(covered) >= 1 - alpha - margin
    assert np.mean(plain) < np.mean(covered) - margin  # a plain quantile gives other sets: the test can fail
    if score == "lac":  # exactly 45/50 in expectation; APS keeps the label crossing the quantile, so it covers more
        assert 1 - alpha - margin <= np.mean(covered) <= 1 - alpha + margin
        assert np.mean(plain) < 1 - alpha - margin  # and a plain quantile undercovers


def test_no_feasible_threshold_is_refused():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(K), 300)
    labels = rng.integers(0, K, 300)  # 90 % wrong at every confidence
    with pytest.raises(sel.InfeasibleRiskError, match="no confidence threshold keeps the error rate"):
        sel.fit_threshold({"probs": probs}, labels, score="confidence", target_risk=0.05, delta=0.1)


def test_entropy_and_mutual_information_thresholds_answer_below_them():
    probs, labels = _known_model(3000, np.random.default_rng(7))
    entropy = -(probs * np.log(probs)).sum(1)
    outputs = {"probs": probs, "entropy": entropy, "mutual_information": entropy / 2}
    for score in ("entropy", "mutual_information"):
        fit = sel.fit_threshold(outputs, labels, score=score, target_risk=0.05, delta=0.1)
        rule = SelectiveConfig(n=3000, score=score, threshold=fit.threshold, target_risk=0.05, delta=0.1,
                               calibration_coverage=fit.coverage, calibration_risk=fit.risk)  # fmt: skip
        abstain, sets = sel.decide(outputs, rule)
        assert sets is None
        np.testing.assert_array_equal(~abstain, outputs[score] <= fit.threshold)
        assert (~abstain).mean() == pytest.approx(fit.coverage)


# ----- the stored rule: config and Predictions --------------------------------------------------------

RULE = {
    "n": 500,
    "fit_on": "toy",
    "score": "confidence",
    "threshold": 0.8,
    "target_risk": 0.05,
    "delta": 0.1,
    "calibration_coverage": 0.5,
    "calibration_risk": 0.01,
    "conformal_alpha": 0.1,
    "conformal_score": "lac",
    "conformal_quantile": 0.7,
}


def test_rule_round_trips_through_the_ensemble_block():
    info = EnsembleInfo(selective=dict(RULE))
    assert isinstance(info.selective, SelectiveConfig)
    assert EnsembleInfo(selective=info.selective.__dict__).selective == info.selective


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"thresold": 0.8}, r"unknown keys \['thresold'\]"),
        ({"threshold": "0.8"}, "ensemble.selective.threshold must be of type int or float"),
        ({"threshold": 1.5}, "ensemble.selective.threshold on confidence must be in"),
        ({"target_risk": 0.0}, r"ensemble.selective.target_risk must be a finite number in \(0.0, 1.0\)"),
        ({"delta": 1}, "ensemble.selective.delta must be a finite number"),
        ({"score": "margin"}, "ensemble.selective.score must be one of"),
        ({"conformal_score": "raps"}, "ensemble.selective.conformal_score must be one of"),
        ({"conformal_alpha": float("nan")}, "ensemble.selective.conformal_alpha must be a finite number"),
        ({"n": True}, "ensemble.selective.n must be of type int"),
        ({"n": 0}, "ensemble.selective.n must be at least 1"),
        ({"conformal_quantile": None}, r"lacks \['ensemble.selective.conformal_quantile'\]"),
        ({"score": None, "threshold": None, "target_risk": None, "delta": None, "calibration_coverage": None,
          "calibration_risk": None, "conformal_alpha": None, "conformal_score": None, "conformal_quantile": None},
         "holds neither a threshold"),
    ],
)  # fmt: skip
def test_bad_rules_are_refused_naming_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        EnsembleInfo(selective={**RULE, **change})


def test_not_an_object_is_refused():
    with pytest.raises(ConfigError, match=r"ensemble\.selective must be a JSON object"):
        EnsembleInfo(selective=[1, 2])


def test_predictions_carry_abstain_and_prediction_sets():
    probs = np.array([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.2, 0.35, 0.45]])
    outputs = {"probs": probs, **{k: np.zeros(3) for k in ("entropy", "expected_entropy", "mutual_information")}}
    outputs["disagreement"] = np.zeros(3)
    rule = SelectiveConfig(**RULE)
    predictions = Predictions.from_outputs(outputs, ["a", "b", "c"], rule)
    np.testing.assert_array_equal(predictions.abstain, [False, True, True])
    assert predictions.prediction_sets == [[0], [0, 1], [2, 1]]  # 1 - p <= 0.7, most probable first
    records = predictions.to_records(top_k=2)
    assert [r["abstain"] for r in records] == [False, True, True]
    assert records[1]["prediction_set"] == ["a", "b"]
    assert predictions[1:].prediction_sets == [[0, 1], [2, 1]]
    plain = Predictions.from_outputs(outputs, ["a", "b", "c"])
    assert plain.abstain is None and "abstain" not in plain.to_records()[0]
