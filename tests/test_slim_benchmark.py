"""benchmarks/slim.py: the run grid, the seed budget rule, the targets' verdicts and the report's tables."""

from __future__ import annotations

import json
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
        "nonzero_params_vs_dense": 0.36,
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
    for name in ("slim_dst_s0", "slim_edst_s0", "slim_dst_global_s0", "slim_edst_global_s0"):
        assert (recipes[name].structure, recipes[name].channel_sparsity, recipes[name].sparsity) == (
            "channel",
            0.6,
            0.5,
        )
    allocation = {name: (r.channel_allocation, r.channel_floor) for name, r in recipes.items() if "slim" in name}
    assert allocation["slim_dst_s1"] == allocation["slim_edst_s0"] == ("uniform", 0.4)  # the narrow members' widths
    assert allocation["slim_dst_global_s0"] == allocation["slim_edst_global_s2"] == ("global", 0.25)  # Chase's
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
        "slim_dst_global": 1,
        "slim_edst_global": 1,
    }
    everything = slim.work_order("slim_dst", all_seeds=True)
    assert len(everything) == len(set(everything)) == 3 * len(slim.METHODS)


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s claim lock until killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_claim_is_held_by_its_process_and_by_every_child_given_it(tmp_path: Path) -> None:
    from quality_runs import claimed  # on sys.path through the fixture

    folder = tmp_path / "run"
    holder = hold_lock(folder / ".claim")
    try:
        with claimed(folder) as hold:
            assert hold is None  # a live process holds it
    finally:
        holder.kill()
        holder.wait()
    with claimed(folder) as hold:  # its process is gone: no stale claim
        assert hold is not None and (folder / ".claim").read_text() == str(os.getpid())
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(hold,))
    try:
        with claimed(folder) as again:
            assert again is None  # the worker let go, but the trainer it started still holds the run
    finally:
        child.kill()
        child.wait()
    with claimed(folder) as again:
        assert again is not None


@pytest.fixture
def fake_grid(slim: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Training and evaluation replaced by a record of the runs trained (evaluating writes the logits file)."""
    trained: list[str] = []

    def train_run(spec, folder: Path, hold: int) -> None:
        os.fstat(hold)  # the claim's descriptor is open while it trains
        trained.append(spec.name)

    def run_logits(folder: Path, group, accelerator, bn: bool) -> dict:
        (folder / slim.LOGITS_NAME).write_text("cached")
        return {}

    monkeypatch.setattr(slim, "train_run", train_run)
    monkeypatch.setattr(slim, "run_logits", run_logits)
    monkeypatch.setattr(slim, "seed_groups", lambda specs, out: {specs[0].load().seed: None})
    monkeypatch.setattr(slim, "rank_slim", lambda logits, group: ["slim_edst", "slim_dst"])
    monkeypatch.setattr(slim, "create_accelerator", lambda: None)
    return trained


def test_workers_share_the_grid_and_train_each_run_once(
    slim: ModuleType, fake_grid: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = {s.name: s for s in slim.build_specs("../shared/datasets/fashion_mnist")}
    worker = slim.Worker(specs, tmp_path, all_seeds=False)
    holder = hold_lock(tmp_path / "slim_dst_s0" / ".claim")  # another worker trains slim DST's seed 0
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the other worker finishes while this one waits
        waits.append(seconds)
        (tmp_path / "slim_dst_s0" / slim.LOGITS_NAME).write_text("cached")
        holder.kill()
        holder.wait()

    monkeypatch.setattr(slim.time, "sleep", sleep)
    try:
        best, order = worker.run(poll_s=7.0)
    finally:
        holder.kill()
        holder.wait()
    assert waits == [7.0]  # it waited once: for the other worker's run and for the ranking it decides
    assert best == "slim_edst" and order == slim.work_order("slim_edst", all_seeds=False)
    unranked = [name for name in slim.work_order(None, all_seeds=False) if name != "slim_dst_s0"]
    assert fake_grid == [*unranked, "slim_edst_s1", "slim_edst_s2"]  # all it could take first, then the ranked runs
    assert slim.Worker(specs, tmp_path, all_seeds=False).run(poll_s=0) == (best, order) and len(fake_grid) == 13


def test_slim_is_paired_with_narrow_seed_by_seed(slim: ModuleType) -> None:
    runs = {"slim_dst_s0": "a0", "slim_dst_s2": "a2", "narrow_dense_ensemble_s0": "n0"}
    runs |= {"narrow_dense_ensemble_s1": "n1", "narrow_dense_ensemble_s2": "n2"}
    assert slim.paired(runs, "slim_dst", "narrow_dense_ensemble") == (["a0", "a2"], ["n0", "n2"])


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
    # unranked slim EDST, both ensembles, both global-allocation runs; slim EDST vs narrow
    assert text.count("fewer than 3 seeds: no claim") == 5 + 1
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
    assert "latency: not measured yet" in text
    assert "not ranked yet" in text and "PASS" not in text


def test_the_report_runs_on_a_partial_grid(slim: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"single_dense_s0": 0.90, "slim_dst_s0": 0.92, "slim_dst_s2": 0.93}
    specs = [spec for spec in slim.build_specs("../shared/datasets/fashion_mnist") if spec.name in present]
    monkeypatch.setattr(slim, "shared_draws", lambda group: None)
    monkeypatch.setattr(slim, "analyse", lambda logits, group, draws: fake_run(logits["acc"], 0.3, 0.02, DENSE, 0))
    monkeypatch.setattr(slim, "training_flops", lambda folder: 1.0)
    monkeypatch.setattr(slim, "nonzero_params", lambda folder: 0.36)
    groups = {0: None, 20: None}
    logits = {name: {"acc": acc} for name, acc in present.items()}
    results_md = tmp_path / "RESULTS.md"
    slim.report(specs, groups, logits, None, tmp_path, None, str(results_md), ["slim_edst_s0"])
    text = results_md.read_text()
    assert "**In progress**: 1 runs of the plan not evaluated yet: slim_edst_s0." in text
    assert "| slim DST | 2 | 0.9250 |" in text  # both of its seeds, averaged
    assert "| narrow dense ensemble | 0 | not run yet |" in text and "latency: not measured yet" in text


def test_a_report_shows_the_latency_of_the_runs_timed_so_far(slim: ModuleType) -> None:
    methods = {m: seeds(0.9, 0.3, 0.02, DENSE, count=1) for m in ("single_dense", "slim_dst", "dense_ensemble")}
    timings = latency({"single_dense_s0": {"fp32": 1.0, "int8": 0.4}, "slim_dst_s0": {"fp32": 0.6, "int8": 0.38}})
    results = {
        "methods": {m: slim.summarise(rows) for m, rows in methods.items()},
        "claims_vs_single_dense": {},
        "versus_narrow": {},
        "latency": timings,
        "latency_targets": {"slim_dst": slim.latency_checks(timings, "slim_dst_s0")},
        "best_slim_on_validation": None,
        "pending": ["dense_ensemble_s1"],
    }
    text = slim.render(results)
    assert "| slim DST | 1 | 0.9000 |" in text and "| 1.00 | 0.36 | 0.60x | 0.60x | 0.38x | 0.38x |" in text
    assert text.split("| dense ensemble | 1 |")[1].split("\n")[0].endswith("| - | - | - | - |")
    assert "latency targets, slim DST: fp32 <= 0.8x at batch 1: met" in text and "slim EDST:" not in text


def test_a_busy_report_reuses_a_latency_cache_of_fewer_runs_on_the_same_weights(
    slim: ModuleType, tmp_path: Path
) -> None:
    for name in ("single_dense_s0", "slim_dst_s0", "narrow_dense_ensemble_s0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    names = ["single_dense_s0", "slim_dst_s0"]
    settings = {
        "runs": {n: (tmp_path / n / "model.safetensors").stat().st_mtime_ns for n in names},
        "threads": 1,
        "batch_sizes": list(slim.BATCH_SIZES),
        "calibration_images": slim.CALIBRATION_IMAGES,
        "timing": slim.TIMING,
    }
    cache = {"settings": settings, **latency({n: {"fp32": 0.6, "int8": 0.4} for n in names})}
    (tmp_path / slim.LATENCY_NAME).write_text(json.dumps(cache))
    more = [*names, "narrow_dense_ensemble_s0"]
    assert slim.measure_latency(tmp_path, more, None, cached_only=True) == cache
    assert slim.measure_latency(tmp_path, more, None, threads=2, cached_only=True) is None
    os.utime(tmp_path / "slim_dst_s0" / "model.safetensors", ns=(1, 1))  # retrained: its timing is stale
    assert slim.measure_latency(tmp_path, more, None, cached_only=True) is None
