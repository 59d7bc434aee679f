"""A run stopped mid-phase and resumed ends with exactly the masks and weights of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freetickets_hub.cli import main

ARGS = [
    "max_train_samples=60",
    "val_size=24",
    "batch_size=16",
    "eval_batch_size=64",
    "update_interval=2",
    "explore_epochs=2",
    "refine_epochs=1",
    "num_members=2",
]


def train_tiny(out: Path, dataset: Path, *extra: str, overrides: tuple[str, ...] = ()) -> int:
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(out)]
    for item in (f"dataset={dataset}", *ARGS, *overrides):
        args += ["--set", item]
    return main([*args, *extra])


@pytest.mark.parametrize(
    ("overrides", "stop_at"),
    [
        (("growth=gradient",), 5),  # mid-exploration, between two mask updates
        pytest.param(
            ("growth=random", "ticket_selection=best_val"), 10, marks=pytest.mark.slow
        ),  # mid refinement phase 2, after the escape
        pytest.param(("method=dst", "epochs=2", "growth=random"), 8, marks=pytest.mark.slow),  # second DST run
    ],
)
def test_resume_matches_uninterrupted_run(
    tmp_path: Path, tiny_dataset: Path, overrides: tuple[str, ...], stop_at: int
) -> None:
    assert train_tiny(tmp_path / "full", tiny_dataset, overrides=overrides) == 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--max-steps", str(stop_at), overrides=overrides) == 0
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # stopped: nothing published yet
    checkpoints = list((tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert [p.name.split("_")[1] for p in checkpoints] == [f"{stop_at:09d}"]
    seconds_before = json.loads((checkpoints[0] / "progress.json").read_text())["progress"]["seconds"]
    assert seconds_before > 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--resume", overrides=overrides) == 0

    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), f"{key} differs after resume"
    summaries = [json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("full", "cut")]
    assert summaries[0]["total_steps"] == summaries[1]["total_steps"]
    assert summaries[1]["wall_time_s"] > seconds_before  # the time before the interruption is counted


def test_resume_without_a_checkpoint_refuses_and_writes_nothing(
    tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As accelerate's and the HF Trainer's ``resume_from_checkpoint``: nothing to continue is an error,
    never a silent run from scratch (for an absent folder and an empty one alike)."""
    for out in (tmp_path / "absent", tmp_path):
        assert train_tiny(out, tiny_dataset, "--resume", overrides=("explore_epochs=0", "num_members=1")) == 2
        err = capsys.readouterr().err
        assert "--resume: no checkpoint in" in err and "drop --resume to start a new run" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "absent").exists() and list(tmp_path.iterdir()) == []
