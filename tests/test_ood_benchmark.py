"""benchmarks/ood.py and its statistics: valid run grid, exact bootstrap metrics, intervals that cover, pairing."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from freetickets_hub.uncertainty.metrics import detection_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import ood
    import ood_stats

    return ood, ood_stats


def test_the_grid_is_three_seeds_of_four_methods_and_edst_levers(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    ood, _ = benchmarks
    specs = ood.build_specs(ood.PRESET, "../shared/datasets/fashion_mnist", list(ood.LEVERS))
    assert [s.name for s in specs[: len(ood.METHODS)]] == [f"{m}_s0" for m in ood.METHODS]  # seed 0 trains first
    recipes = {spec.name: spec.load() for spec in specs}  # strict: an unknown key or bad value raises
    for method in ood.METHODS:
        assert {recipes[f"{method}_s{seed}"].seed for seed in ood.SEEDS} == {0, 10, 20}
    assert all(r.exclude_classes == list(ood.HELD_OUT) for r in recipes.values())
    edst, dense = recipes["edst_ensemble_s0"], recipes["single_dense_s0"]
    assert (edst.explore_epochs + 3 * edst.refine_epochs) / dense.epochs == pytest.approx(1.8)
    for name in ood.LEVERS:  # one change each from the grid's EDST at seed 0
        changed = {k for k, v in recipes[name].to_dict().items() if v != edst.to_dict()[k]}
        assert recipes[name].method == "edst" and recipes[name].seed == 0 and 1 <= len(changed) <= 2, (name, changed)
    assert recipes["edst_cigl"].random_mask_rate == 0.01 and recipes["edst_cigl"].average_fraction == 0.3
    assert (recipes["edst_cyclic"].average_cycles, recipes["edst_cyclic"].average_fraction) == (3, 0.3)


def test_unit_draw_reproduces_detection_metrics(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    _, stats = benchmarks
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(1, 1, 3000).round(2), rng.normal(0, 1, 700).round(2)  # ties included
    ones = stats.Draws(np.ones((1, 3000)), np.ones((1, 700)))
    got = stats.bootstrap_detection(inside, outside, ones)
    want = detection_metrics(torch.from_numpy(inside), torch.from_numpy(outside))
    assert got["auroc"][0] == pytest.approx(want["auroc"], abs=1e-6)
    assert got["fpr_at_95_tpr"][0] == pytest.approx(want["fpr_at_95_tpr"], abs=1e-6)


def test_intervals_cover_the_true_auroc_at_about_their_level(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    """Scores N(d, 1) vs N(0, 1) have AUROC Phi(d / sqrt 2); 95 % intervals must hold it about 95 % of the time."""
    _, stats = benchmarks
    true = 0.5 * (1 + torch.erf(torch.tensor(0.5))).item()  # d = 1: Phi(1 / sqrt 2)
    hits = 0
    for trial in range(60):
        rng = np.random.default_rng(trial)
        inside, outside = rng.normal(1, 1, 400), rng.normal(0, 1, 200)
        low, high = stats.interval(
            stats.bootstrap_detection(inside, outside, stats.Draws.make(400, 200, 400, trial))["auroc"]
        )
        hits += low <= true <= high
    assert hits >= 51  # 95 % of 60 is 57; a binomial 1 % lower tail is about 52


def test_shared_draws_pair_runs_so_a_small_real_difference_separates(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    _, stats = benchmarks
    rng = np.random.default_rng(1)
    inside, outside = rng.normal(1, 1, 2000), rng.normal(0, 1, 500)
    better_in = inside + 0.05  # the same images, a slightly better detector
    draws = stats.Draws.make(2000, 500, 500, 0)
    a = stats.bootstrap_detection(better_in, outside, draws)["auroc"]
    b = stats.bootstrap_detection(inside, outside, draws)["auroc"]
    assert stats.separated(a - b, [0.01, 0.02, 0.01])  # paired: tiny difference, tight interval
    assert not stats.separated(a - b, [0.01, -0.02, 0.01])  # a seed that disagrees vetoes the claim
    unpaired = a - stats.bootstrap_detection(inside, outside, stats.Draws.make(2000, 500, 500, 1))["auroc"]
    assert np.std(unpaired) > 3 * np.std(a - b)


def test_a_finished_run_stays_valid_when_a_later_version_adds_a_recipe_key(
    benchmarks: tuple[ModuleType, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quality_runs  # on sys.path through the fixture

    ood, _ = benchmarks
    spec = ood.build_specs(ood.PRESET, "../shared/datasets/fashion_mnist", [])[0]
    recipe = spec.load().to_dict()
    older = {k: v for k, v in recipe.items() if k not in ("average_cycles", "average_cycle_lr")}  # before those keys
    (tmp_path / "train_summary.json").write_text(json.dumps({"recipe": older}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(quality_runs, "_summary", lambda folder, stored: {"skipped": True})
    assert quality_runs.train_run(spec, tmp_path, log=lambda _: None) == {"skipped": True}
    (tmp_path / "train_summary.json").write_text(json.dumps({"recipe": {**older, "lr": 0.5}}))
    with pytest.raises(quality_runs.FreeTicketsError, match="holds a run of another recipe"):
        quality_runs.train_run(spec, tmp_path, log=lambda _: None)


def test_the_best_two_levers_are_combined_unless_a_lever_already_is_their_union(
    benchmarks: tuple[ModuleType, ModuleType],
) -> None:
    ood, _ = benchmarks
    levers = dict(ood.LEVERS)
    assert ood.combination(levers, "edst_avg0.3", "edst_rmask0.01") is None  # that is edst_cigl
    assert ood.combination(levers, "edst_cyclic", "edst_avg0.3") is None  # the cyclic lever contains the average
    name, (label, overrides) = ood.combination(levers, "edst_cyclic", "edst_rmask0.01")
    assert name == "edst_cyclic+edst_rmask0.01" and " + " in label
    assert overrides == ["average_fraction=0.3", "average_cycles=3", "random_mask_rate=0.01"]
    levers[name] = (label, overrides)
    spec = ood.lever_spec(ood.PRESET, "../shared/datasets/fashion_mnist", name, 0, levers)
    recipe = spec.load()
    assert (recipe.average_cycles, recipe.random_mask_rate, recipe.method) == (3, 0.01, "edst")


def _difference(value: float, low: float, high: float, separated: bool) -> dict:
    return {"entropy": {"difference": value, "interval": [low, high], "separated": separated}}


def test_the_goal_needs_the_flops_budget_every_kind_and_calibration_at_most_the_dense_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import ood_report

    dense = {"nll": [0.30, 0.31, 0.29], "ece": [0.02, 0.02, 0.02], "training_flops_vs_single_dense": 1.0}
    edst = {"nll": [0.29, 0.30, 0.28], "ece": [0.01, 0.02, 0.01], "training_flops_vs_single_dense": 0.6}
    ties = {k: _difference(0.0, -0.01, 0.01, False) for k in ("near", "shifted", "far")}
    assert ood_report.goal(edst, dense, ties)["met"]
    below = {**ties, "far": _difference(-0.004, -0.006, -0.002, False)}  # interval below 0, a seed above
    assert ood_report.goal(edst, dense, below)["kinds"]["far"] == "below (seeds disagree)"
    assert not ood_report.goal(edst, dense, below)["met"]
    assert not ood_report.goal({**edst, "ece": [0.03, 0.03, 0.03]}, dense, ties)["met"]  # worse calibrated ECE
    assert not ood_report.goal({**edst, "nll": [0.32, 0.32, 0.32]}, dense, ties)["met"]  # worse calibrated NLL
    assert not ood_report.goal({**edst, "training_flops_vs_single_dense": 0.7}, dense, ties)["met"]  # over budget
