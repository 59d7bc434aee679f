"""benchmarks/gpu_check.py: it refuses to start without a GPU, and its dry run (--device cpu) passes every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing trained


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_passes_every_stage(tmp_path: Path, tiny_dataset: Path) -> None:
    out = tmp_path / "check"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--dataset", str(tiny_dataset), "--output-dir", str(out)]
    result = subprocess.run(
        [*command, "--batch-sizes", "1", "8", "--min-run-time", "0.2"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert set(results["training"]) == {"bf16", "fp16"}
    for row in results["training"].values():  # 64 training images / batch 16: 4 steps per epoch, 5 epochs
        assert row["total_steps"] + row["skipped_steps"] == 20
    assert "resumed" in result.stdout and (out / "bf16" / "onnx" / "model.onnx").is_file()
    assert results["onnx"]["provider"] == "CPUExecutionProvider" and results["onnx"]["max_abs_diff_probs"] < 1e-3
    assert [r["batch"] for r in results["onnx"]["throughput"]] == [1, 8]
    assert all(r["torch_images_per_s"] > 0 and r["ort_images_per_s"] > 0 for r in results["onnx"]["throughput"])
