"""benchmarks/slim.py: the run grid, the seed budget rule, the targets' verdicts and the report's tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("near", "shifted", "far")


@pytest.fixture
def slim(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import slim

    return slim


def fake_run(accuracy: float, nll: float, ece: float, auroc: dict[str, float], seed: int) -> dict:
    """What ``ood_report.analyse`` returns, reduced to what the slim report reads: one OOD set per kind."""
    rng = np.random.default_rng(seed)
    sets, draws = {}, {}
    for kind, value in auroc.items():
        points = {"entropy": {"auroc": value}, "msp": {"auroc": value}}
        sets[kind] = {"kind": kind, "calibrated": points, "diversity": {"disagreement": 0.2}}
        noise = rng.normal(0, 0.002, 1000)
        draws[kind] = {"entropy": {"auroc": value + noise}, "msp": {"auroc": value + noise}}
    return {
        "test": {"accuracy": accuracy, "nll": nll, "ece": ece},
        "test_diversity": {"disagreement": 0.05},
        "sets": sets,
        "draws": draws,
        "training_flops_vs_single_dense": 1.0,
    }


def seeds(accuracy: float, nll: float, ece: float, auroc: dict[str, float], count: int = 3) -> list[dict]:
    return [fake_run(accuracy, nll, ece, auroc, seed) for seed in range(count)]


DENSE = {"near": 0.90, "shifted": 0.80, "far": 0.95}


def test_the_grid_is_the_ood_benchmark_on_wrn16_4_with_the_slim_methods(slim: ModuleType) -> None:
    specs = {s.name: s for s in slim.build_specs("../shared/datasets/fashion_mnist")}
    assert set(specs) == {f"{m}_s{s}" for m in slim.METHODS for s in (0, 1, 2)}
    recipes = {name: spec.load() for name, spec in specs.items()}  # strict: an unknown key or bad value raises
    assert {r.architecture for r in recipes.values()} == {"cifar_wrn16_4"}
    assert all(r.exclude_classes == ["Shirt", "Sneaker"] for r in recipes.values())
    dense, edst = recipes["single_dense_s0"], recipes["slim_edst_s0"]
    assert (edst.explore_epochs + 3 * edst.refine_epochs) / dense.epochs == pytest.approx(1.8)  # equal epochs rule
    assert recipes["slim_dst_s0"].epochs == dense.epochs
    for name in ("slim_dst_s0", "slim_edst_s0"):
        assert (recipes[name].structure, recipes[name].channel_sparsity, recipes[name].sparsity) == (
            "channel",
            0.6,
            0.5,
        )
    narrow = recipes["narrow_dense_ensemble_s0"]
    assert (narrow.method, narrow.channel_sparsity, narrow.num_members) == ("narrow_dense_ensemble", 0.6, 3)
    assert (recipes["edst_ensemble_s0"].structure, recipes["edst_ensemble_s0"].sparsity) == ("unstructured", 0.8)
    assert {recipes[f"slim_dst_s{s}"].seed for s in (0, 1, 2)} == {0, 10, 20}


def method_seeds(order: list[str]) -> dict[str, int]:
    return dict(Counter(name.rsplit("_s", 1)[0] for name in order))


def test_the_cpu_budget_trains_three_seeds_of_dense_narrow_and_the_best_slim_method(slim: ModuleType) -> None:
    unranked = slim.work_order(None, all_seeds=False)
    assert unranked[:2] == ["slim_dst_s0", "slim_edst_s0"]  # seed 0 of both slim methods decides the ranking
    assert not any(name.startswith("slim") and not name.endswith("_s0") for name in unranked)
    ranked = slim.work_order("slim_edst", all_seeds=False)
    assert [name for name in ranked if name in unranked] == unranked  # the ranking only adds runs
    assert ranked.index("slim_edst_s2") < ranked.index("edst_ensemble_s0")  # the claims' runs come first
    assert method_seeds(ranked) == {
        "slim_dst": 1,
        "slim_edst": 3,
        "single_dense": 3,
        "narrow_dense_ensemble": 3,
        "edst_ensemble": 1,
        "dense_ensemble": 1,
    }
    everything = slim.work_order("slim_dst", all_seeds=True)
    assert len(everything) == len(set(everything)) == 3 * len(slim.METHODS)


def test_workers_share_the_grid_and_train_each_run_once(
    slim: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []

    def train_run(spec, folder: Path) -> None:
        assert (folder / ".claim").read_text() == str(os.getpid())  # held while it trains
        trained.append(spec.name)

    def run_logits(folder: Path, group, accelerator, bn: bool) -> dict:
        (folder / slim.LOGITS_NAME).write_text("cached")
        return {}

    monkeypatch.setattr(slim, "train_run", train_run)
    monkeypatch.setattr(slim, "run_logits", run_logits)
    monkeypatch.setattr(slim, "seed_groups", lambda specs, out: {specs[0].load().seed: None})
    monkeypatch.setattr(slim, "rank_slim", lambda logits, group: ["slim_edst", "slim_dst"])
    monkeypatch.setattr(slim, "create_accelerator", lambda: None)
    specs = {s.name: s for s in slim.build_specs("../shared/datasets/fashion_mnist")}
    worker = slim.Worker(specs, tmp_path, all_seeds=False)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "slim_dst_s0").mkdir()
        (tmp_path / "slim_dst_s0" / ".claim").write_text(str(other.pid))
        assert not worker.take("slim_dst_s0") and trained == []  # a live worker holds it
    finally:
        other.kill()
        other.wait()
    best, order = worker.run(poll_s=0)  # the claim of a process that is gone is taken over
    assert best == "slim_edst" and trained == order == slim.work_order("slim_edst", all_seeds=False)
    assert not list(tmp_path.glob("*/.claim"))
    assert slim.Worker(specs, tmp_path, all_seeds=False).run(poll_s=0) == (best, order) and len(trained) == 12


def test_a_claim_needs_three_seeds_and_every_check(slim: ModuleType) -> None:
    base = seeds(0.90, 0.30, 0.02, DENSE)
    better = seeds(0.91, 0.28, 0.015, {k: v + 0.02 for k, v in DENSE.items()})
    claim = slim.claims(better, base)
    assert claim["pass"] and set(claim["kinds"].values()) == {"better"}
    assert slim.claims(better[:1], base) is None  # seed 0 alone makes no claim
    far_worse = seeds(0.91, 0.28, 0.015, {**DENSE, "far": 0.90})
    claim = slim.claims(far_worse, base)
    assert claim["kinds"]["far"] == "worse" and not claim["pass"]
    two_of_three_lower = [  # the mean is below and its interval excludes 0, but seed 2 is above
        fake_run(0.91, 0.28, 0.015, {**DENSE, "shifted": 0.80 + shift}, seed)
        for seed, shift in enumerate((-0.01, -0.01, 0.005))
    ]
    claim = slim.claims(two_of_three_lower, base)
    assert claim["kinds"]["shifted"] == "below (seeds disagree)" and not claim["pass"]
    less_accurate = seeds(0.89, 0.28, 0.015, DENSE)
    claim = slim.claims(less_accurate, base)
    assert not claim["checks"]["accuracy >="] and not claim["pass"]
    assert set(claim["kinds"].values()) == {"tie"}


def test_slim_against_narrow_compares_at_the_seeds_both_have_and_judges_only_at_three(slim: ModuleType) -> None:
    narrow = seeds(0.90, 0.30, 0.02, DENSE)
    block = slim.versus_narrow(seeds(0.92, 0.27, 0.02, DENSE), narrow[:1])
    assert block["seeds"] == 1 and block["at_least_as_good"] is None and block["kinds"] is None
    assert block["delta"]["accuracy"] == pytest.approx(0.02)  # the difference is still reported
    assert slim.versus_narrow(seeds(0.92, 0.27, 0.02, DENSE), narrow)["at_least_as_good"] is True
    assert slim.versus_narrow(seeds(0.92, 0.31, 0.02, DENSE), narrow)["at_least_as_good"] is False  # worse NLL
    assert slim.versus_narrow(seeds(0.92, 0.27, 0.03, DENSE), narrow)["at_least_as_good"] is False  # worse ECE
    far_worse = slim.versus_narrow(seeds(0.92, 0.27, 0.02, {**DENSE, "far": 0.9}), narrow)
    assert far_worse["kinds"]["far"] == "worse" and far_worse["at_least_as_good"] is False


def latency(ratios: dict[str, dict[str, float]]) -> dict:
    return {
        "runs": {
            name: {p: {str(b): {"ratio": r} for b in (1, 64)} for p, r in by_precision.items()}
            for name, by_precision in ratios.items()
        }
    }


def test_latency_targets_are_at_most_0_8x_fp32_and_0_5x_int8_at_every_batch(slim: ModuleType) -> None:
    timings = latency({"slim_dst_s0": {"fp32": 0.8, "int8": 0.49}, "slim_edst_s0": {"fp32": 0.81, "int8": 0.51}})
    assert all(slim.latency_checks(timings, "slim_dst_s0").values())
    assert not any(slim.latency_checks(timings, "slim_edst_s0").values())


def test_the_report_shows_every_method_and_says_which_make_no_claim(slim: ModuleType) -> None:
    three = ("single_dense", "slim_dst", "narrow_dense_ensemble")
    methods = {m: seeds(0.9, 0.3, 0.02, DENSE, count=3 if m in three else 1) for m in slim.METHODS}
    timings = latency({f"{m}_s0": {"fp32": 0.7, "int8": 0.45} for m in slim.METHODS})
    results = {
        "methods": {m: slim.summarise(rows) for m, rows in methods.items()},
        "claims_vs_single_dense": {
            m: slim.claims(r, methods["single_dense"]) for m, r in methods.items() if m != "single_dense"
        },
        "versus_narrow": {m: slim.versus_narrow(methods[m], methods["narrow_dense_ensemble"]) for m in slim.SLIM},
        "latency": timings,
        "latency_targets": {m: slim.latency_checks(timings, f"{m}_s0") for m in slim.SLIM},
        "best_slim_on_validation": "slim_dst",
        "pending": [],
    }
    text = slim.render(results)
    assert all(label in text for label, _, _ in slim.METHODS.values())
    assert text.count("fewer than 3 seeds: no claim") == 3 + 1  # unranked slim EDST, both ensembles; EDST vs narrow
    assert "| slim DST | tie | tie | tie |" in text
    assert "latency targets, slim DST: fp32 <= 0.8x at batch 1: met" in text


def test_a_report_in_progress_shows_what_is_missing_and_claims_nothing(slim: ModuleType) -> None:
    methods = {"single_dense": seeds(0.9, 0.3, 0.02, DENSE, count=1), "slim_dst": seeds(0.91, 0.3, 0.02, DENSE, 1)}
    results = {
        "methods": {m: slim.summarise(rows) for m, rows in methods.items()},
        "claims_vs_single_dense": {"slim_dst": slim.claims(methods["slim_dst"], methods["single_dense"])},
        "versus_narrow": {},
        "latency": None,
        "latency_targets": {},
        "best_slim_on_validation": None,
        "pending": ["slim_edst_s0", "single_dense_s1"],
    }
    text = slim.render(results)
    assert "**In progress**: 2 runs of the plan not evaluated yet: slim_edst_s0, single_dense_s1." in text
    for label in ("dense ensemble", "unstructured EDST", "slim EDST", "narrow dense ensemble"):
        assert f"| {label} | 0 | not run yet |" in text and f"| {label} | - | - | - | not run yet | - |" in text
    assert "| slim DST | - | - | - | fewer than 3 seeds: no claim | - |" in text
    assert "latency: measured once every method's seed-0 run is evaluated" in text
    assert "not ranked yet" in text and "PASS" not in text
