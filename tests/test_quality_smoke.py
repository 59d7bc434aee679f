"""benchmarks/quality.py --preset smoke on real Fashion-MNIST: a complete, finite table; a rerun retrains nothing."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SHARED_FMNIST

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "single_dense": "single dense",
    "dense_ensemble": "dense ensemble",
    "dst_ensemble": "DST ensemble",
    "edst_ensemble": "EDST ensemble",
    "static_sparse_ensemble": "static sparse ensemble",
}
NUMBERS = [
    *(f"{k}{suffix}" for k in ("accuracy", "nll", "ece", "brier") for suffix in ("", "_calibrated")),
    "temperature",
    "mean_member_accuracy",
    "mean_member_nll_calibrated",
    "ood_auroc_entropy",
    "ood_auroc_mutual_information",
    "ood_auroc_entropy_shifted",
    "ood_auroc_entropy_far",
    "corruption_accuracy",
    "corruption_nll",
    "disagreement",
    "training_flops",
    "training_flops_vs_single_dense",
    "wall_time_s",
    "wall_time_vs_single_dense",
    "inference_flops",
    "params_nonzero",
    "artifact_bytes",
]
# one model has no member disagreement and no mutual information
NOT_APPLICABLE = {("single_dense", "ood_auroc_mutual_information"), ("single_dense", "disagreement")}


def _run(out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/quality.py", "--preset", "smoke", "--output-dir", str(out)]
    result = subprocess.run([*command, "--results-md", ""], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 5 minutes on an idle 2-core CPU; far longer on a busy one
@pytest.mark.skipif(not SHARED_FMNIST.exists(), reason="needs ../shared/datasets/fashion_mnist")
def test_smoke_preset_is_complete_finite_and_resumable(tmp_path: Path) -> None:
    out = tmp_path / "quality-smoke"
    _run(out)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for name, row in results["methods"].items():
        for key in NUMBERS:
            if (name, key) in NOT_APPLICABLE:
                assert row[key] is None, (name, key)
            else:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key, row[key])
        assert 0.0 < row["accuracy"] <= 1.0 and row["temperature"] > 0
    edst = results["methods"]["edst_ensemble"]["epochs"]
    assert (edst["explore"] + 3 * edst["refine"]) / results["methods"]["single_dense"]["epochs"]["per_member"] == 1.8
    rows = results["methods"]
    for name, row in rows.items():  # each ratio is that method's own FLOPs over the single dense model's
        assert row["training_flops_vs_single_dense"] == pytest.approx(
            row["training_flops"] / rows["single_dense"]["training_flops"]
        ), name
    dense_ensemble = rows["dense_ensemble"]["training_flops_vs_single_dense"]
    assert dense_ensemble == pytest.approx(3.0, rel=0.02)  # three dense members of the same epochs
    for name in ("dst_ensemble", "edst_ensemble", "static_sparse_ensemble"):  # sparse members cost less
        assert rows[name]["training_flops_vs_single_dense"] < dense_ensemble, name
    assert rows["edst_ensemble"]["training_flops_vs_single_dense"] < 1.8  # 1.8 E epochs at 80 % sparsity
    assert len(results["targets"]) == 7 and all(isinstance(t["pass"], bool) for t in results["targets"])
    markdown = (out / "results.md").read_text()
    for label in METHODS.values():
        assert markdown.count(f"| {label} |") == 3, label  # one row in each of the three tables
    assert not re.search(r"\b(nan|inf)\b", markdown, re.IGNORECASE)
    assert markdown.count("**PASS**") + markdown.count("**MISS**") == 7
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run finds every method trained and evaluated: nothing is retrained, the numbers are the same
    weights = {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in METHODS}
    second = _run(out)
    for name in METHODS:
        assert f"skip {name}: already trained" in second.stdout
        assert (out / name / "model.safetensors").stat().st_mtime_ns == weights[name]
    assert not [line for line in second.stdout.splitlines() if line.startswith("train ")]
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_edst_overrides_reach_the_edst_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--edst-set`` (e.g. the recipe search's schedule) changes EDST; the four baselines stay comparable."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    plain = {s.name: s.load() for s in quality.build_specs(quality.PRESETS["full"], "ds", [])}
    tuned = quality.build_specs(quality.PRESETS["full"], "ds", [], ["explore_epochs=6", "refine_epochs=1"])
    for spec in tuned:
        recipe = spec.load()
        if spec.name == "edst_ensemble":
            assert (recipe.explore_epochs, recipe.refine_epochs) == (6, 1)
            assert (plain[spec.name].explore_epochs, plain[spec.name].refine_epochs) == (3, 2)
        else:
            assert recipe == plain[spec.name], spec.name
