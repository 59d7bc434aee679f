"""Two CPU processes over gloo: masks identical on every rank after every update, data really split."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, BATCH = 64, 8


LEVERS = ("random_mask_rate=0.1", "average_fraction=0.5", "average_cycles=2")  # issue 24, all at once
SLIM = ("structure=channel", "channel_sparsity=0.5")  # issue 23: removal and the escape's restore, on 2 ranks


@pytest.mark.parametrize(
    ("growth", "levers"),
    [
        ("gradient", ()),
        pytest.param("random", (), marks=pytest.mark.slow),
        pytest.param("gradient", LEVERS, marks=pytest.mark.slow, id="overconfidence-levers"),
        pytest.param("gradient", SLIM, marks=pytest.mark.slow, id="slim-channels"),
    ],
)
def test_two_processes_keep_masks_identical_and_split_data(
    tmp_path: Path, tiny_dataset: Path, growth: str, levers: tuple[str, ...]
) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None
    overrides = [
        f"dataset={tiny_dataset}",
        f"max_train_samples={TRAIN_IMAGES}",
        "val_size=16",
        f"batch_size={BATCH}",
        "update_interval=2",
        "explore_epochs=1",
        "refine_epochs=1",
        "num_members=2",
        f"growth={growth}",
        *levers,
    ]
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    cmd += ["--dynamo_backend", "no", "-m", "freetickets_hub.cli", "train"]
    cmd += ["--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(tmp_path / "out")]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    dist = summary["distributed"]
    assert dist["num_processes"] == 2
    hashes = dist["mask_hashes_by_process"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # each process sees half of every epoch: a process training alone on all the data would see 8
    assert dist["batches_per_epoch_per_process"] == TRAIN_IMAGES // (2 * BATCH)
    epochs = 1 + 2  # exploration + two refinement phases
    assert summary["total_steps"] == epochs * TRAIN_IMAGES // (2 * BATCH)
    assert summary["costs"]["train_images_processed"] == epochs * TRAIN_IMAGES
    assert "mask update" in result.stdout  # the updates really happened (and were checked across ranks)
    if levers == LEVERS:
        assert "ticket averaged over" in result.stdout
    if levers == SLIM:  # removed on both ranks alike (the hashes above), restored at the escape
        assert "channels removed" in result.stdout and "every channel restored" in result.stdout
        assert summary["channels"]["kept_overlap"]["0-1"] < 1.0
