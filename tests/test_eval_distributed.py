"""``freetickets evaluate`` on 2 CPU processes under accelerate gives the numbers of 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from freetickets_hub.cli import main

from .test_evaluation import LABELS, model_labels, random_images, save_tiny_ensemble, write_dataset

NUM_IMAGES = 37  # odd, with batches of 4: the last round is padded with repeats that must be dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two extra Python processes importing torch: 25 s on an idle 2-core machine, 70 s on a busy one
def test_two_processes_match_one(tmp_path: Path) -> None:
    model = save_tiny_ensemble(tmp_path / "model")
    images = random_images(NUM_IMAGES, seed=2)
    data = write_dataset(tmp_path / "data", {"test": (images, model_labels(model, images, flip=0.3))}, LABELS)
    args = ["evaluate", str(tmp_path / "model"), "--dataset", str(data), "--ood-dataset", "sklearn:digits"]
    args += ["--max-samples", "45", "--corruptions", "gaussian_noise", "--batch-size", "4"]  # noise seeded per image

    assert main([*args, "--output", str(tmp_path / "one.json")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "freetickets_hub.cli"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, *args, "--output", str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())

    # the work was really split: each process saw about half, repeats included, never all of it
    assert one["runtime"]["images_per_process"] == [NUM_IMAGES]
    assert two["runtime"]["num_processes"] == 2
    per_process = two["runtime"]["images_per_process"]
    assert len(per_process) == 2 and max(per_process) < NUM_IMAGES and sum(per_process) >= NUM_IMAGES
    one.pop("runtime"), two.pop("runtime")
    assert two["num_images"] == NUM_IMAGES
    _assert_close(one, two)


def _assert_close(a: object, b: object, path: str = "results") -> None:
    """Equal structure, equal strings, numbers within 1e-5 (float32 forward passes in other batch groupings)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), path
    else:
        assert a == b, path
