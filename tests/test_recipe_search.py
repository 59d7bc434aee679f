"""benchmarks/recipe_search.py: valid candidates, selection on validation under a FLOPs cap, an end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import SHARED_FMNIST

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def search(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import recipe_search

    return recipe_search


def test_candidates_are_valid_recipes_with_the_edst_budget(search: ModuleType) -> None:
    specs = search.build_specs("../shared/datasets/fashion_mnist", 10_000, 5)
    recipes = {spec.name: spec.load() for spec in specs}  # strict: an unknown key or bad value raises
    assert recipes["single_dense"].method == "dense" and recipes["single_dense"].epochs == 5
    edst = {name: r for name, r in recipes.items() if name != "single_dense"}
    assert len(edst) == len(search.candidates(5)) >= 5
    for name, recipe in edst.items():
        assert recipe.method == "edst" and recipe.num_members == 3, name
        assert recipe.explore_epochs + 3 * recipe.refine_epochs == 9, name  # 1.8 x E
        assert (recipe.seed, recipe.val_size, recipe.ticket_selection) == (0, 5000, "last"), name
    assert edst["edst_wide_s0.9"].model_args == {"widen_factor": 4}
    assert edst["edst_s0.5"].sparsity == 0.5
    assert edst["edst_baseline"].sparsity == 0.8 and edst["edst_baseline"].escape_rate == 0.8


def test_select_takes_the_most_accurate_affordable_candidate(search: ModuleType) -> None:
    rows = {
        "single_dense": {"accuracy": 0.95, "flops_vs_dense": 1.0},
        "a": {"accuracy": 0.90, "flops_vs_dense": 0.6},
        "b": {"accuracy": 0.92, "flops_vs_dense": 0.9},
        "c": {"accuracy": 0.99, "flops_vs_dense": 1.4},  # more accurate, but costs more than dense
    }
    assert search.select(rows) == "b"
    assert search.select({"single_dense": rows["single_dense"], "c": rows["c"]}) is None


def test_target_is_half_a_point_and_no_worse_nll(search: ModuleType) -> None:
    dense = {"accuracy": 0.900, "nll_calibrated": 0.30}
    assert search.meets_target({"accuracy": 0.8951, "nll_calibrated": 0.30}, dense)
    assert not search.meets_target({"accuracy": 0.8940, "nll_calibrated": 0.29}, dense)
    assert not search.meets_target({"accuracy": 0.91, "nll_calibrated": 0.31}, dense)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not SHARED_FMNIST.exists(), reason="needs ../shared/datasets/fashion_mnist")
def test_tiny_search_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "search"
    command = [sys.executable, "benchmarks/recipe_search.py", "--output-dir", str(out), "--train-images", "512"]
    result = subprocess.run([*command, "--results-md", ""], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"single_dense", *(n for n in results["runs"] if n.startswith("edst_"))}
    assert len(results["runs"]) == 7
    for row in results["runs"].values():
        assert all(math.isfinite(row[k]) for k in ("accuracy", "nll", "nll_calibrated", "flops_vs_dense"))
    assert results["runs"]["edst_wide_s0.9"]["flops_vs_dense"] > results["runs"]["edst_baseline"]["flops_vs_dense"]
    assert "### EDST recipe search" in (out / "results.md").read_text()
    if results["selected"] is not None:
        assert set(results["test"]) == {"single_dense", results["selected"]}
