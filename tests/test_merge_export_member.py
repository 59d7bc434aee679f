"""`freetickets merge` combines runs of the same architecture; `export_member` writes a plain timm folder."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from freetickets_hub import ConfigError, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.model.merge import merge_ensembles

from .conftest_hub import INPUT, LABELS, make_ensemble

PIXELS = torch.randn(4, *INPUT, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two DST runs saved to disk: M=2 (calibrated) and M=1."""
    root = tmp_path_factory.mktemp("runs")
    first = make_ensemble(seed=1, members=2, method="dst")
    first.set_temperature(1.3, fit_on="validation")
    first.save_pretrained(root / "a")
    make_ensemble(seed=2, members=1, method="dst").save_pretrained(root / "b")
    return [root / "a", root / "b"]


def test_merge_cli_concatenates_members_and_drops_the_temperature(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="freetickets_hub.model.merge"):
        assert main(["merge", *map(str, runs), "--output", str(tmp_path / "merged")]) == 0
    assert f"Dropping the calibration temperature of {runs[0]}" in caplog.text
    assert "merged 2 runs into 3 members (method dst, sparsity 0.8)" in capsys.readouterr().out
    merged = EnsembleModel.from_pretrained(tmp_path / "merged")
    assert (merged.num_members, merged.config.ensemble.method, merged.config.ensemble.sparsity) == (3, "dst", 0.8)
    assert merged.config.ensemble.calibration is None and merged.temperature == 1.0
    inputs = [EnsembleModel.from_pretrained(run) for run in runs]
    expected = torch.cat([m.member_logits(PIXELS) for m in inputs])
    assert torch.equal(merged.member_logits(PIXELS), expected)
    assert [len(m) for m in merged.masks] == [len(m) for model in inputs for m in model.masks]


def test_merging_other_methods_gives_merged(runs: list[Path]) -> None:
    edst = make_ensemble(seed=3, members=1, method="edst")
    merged = merge_ensembles([EnsembleModel.from_pretrained(runs[1]), edst])
    assert merged.config.ensemble.method == "merged"


MISMATCHES = {
    "architecture": ({"architecture": "cifar_wrn16_4"}, r"architecture differs \('cifar_wrn16_4' vs 'cifar_wrn10_2'\)"),
    "label_names": ({"label_names": [f"other_{i}" for i in range(10)]}, "label_names differs"),
    "num_classes": ({"num_classes": 5, "label_names": LABELS[:5]}, r"num_classes differs \(5 vs 10\)"),
    "model_args": ({"model_args": {"in_chans": 1, "drop_rate": 0.1}}, "model_args differs"),
    "input": (
        {"pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.1], "std": [0.5], "crop_pct": 1.0}},
        r"pretrained_cfg.mean differs \(\[0.1\] vs \[0.5\]\)",
    ),
    "sparsity": ({"sparsity": 0.9}, r"ensemble.sparsity differs \(0.9 vs 0.8\)"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_mismatched_runs_are_refused_naming_the_field(case: str) -> None:
    overrides, message = MISMATCHES[case]
    reference = make_ensemble(seed=0, members=1)
    other = make_ensemble(seed=1, members=1, **overrides)
    with pytest.raises(ConfigError, match=f"cannot merge run-b into run-a: {message}"):
        merge_ensembles([reference, other], names=["run-a", "run-b"])


def test_merge_cli_reports_a_mismatch(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_ensemble(seed=4, members=1, sparsity=0.5).save_pretrained(tmp_path / "c")
    assert main(["merge", str(runs[0]), str(tmp_path / "c"), "--output", str(tmp_path / "out")]) == 2
    assert "freetickets merge: error: cannot merge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_member_loads_in_timm_with_identical_outputs(runs: list[Path], tmp_path: Path) -> None:
    model = EnsembleModel.from_pretrained(runs[0])
    folder = model.export_member(1, tmp_path / "member1")
    config = json.loads((folder / "config.json").read_text())
    assert {"architecture", "num_classes", "num_features", "model_args", "pretrained_cfg", "label_names"} <= set(config)
    assert config["pretrained_cfg"]["input_size"] == list(INPUT) and config["pretrained_cfg"]["mean"] == [0.5]
    member = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert torch.equal(member(PIXELS), model.members[1](PIXELS))
    assert member.pretrained_cfg["label_names"] == LABELS
    data_config = timm.data.resolve_data_config(model=member)
    assert (tuple(data_config["input_size"]), list(data_config["mean"])) == (INPUT, [0.5])
    with pytest.raises(IndexError, match="member 2 does not exist: the ensemble has 2 member"):
        model.export_member(2, tmp_path / "nope")


def test_timm_needs_the_architectures_import_first(runs: list[Path], tmp_path: Path) -> None:
    folder = EnsembleModel.from_pretrained(runs[1]).export_member(0, tmp_path / "member0")
    code = (
        "import sys, timm\n"
        "try:\n    timm.create_model('local-dir:' + sys.argv[1], pretrained=True)\n"
        "except RuntimeError as e:\n    print(e)\n"
        "import freetickets_hub.model.architectures\n"
        "print(type(timm.create_model('local-dir:' + sys.argv[1], pretrained=True)).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Unknown model (cifar_wrn10_2)", "WideResNet"]
