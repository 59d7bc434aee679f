"""The GPU check, in one go: train, resume, evaluate, export and serve the tiny recipe on one GPU.

1. trains ``training/recipes/fmnist_tiny_edst.yaml`` (EDST, M=3) in bf16 and in fp16, each stopped
   after the first forced escape (``--max-steps``) and resumed to the end;
2. evaluates the bf16 ensemble (``freetickets evaluate``) and exports it (``freetickets export onnx``);
3. loads it in ``OnnxEnsemble`` with the CUDA execution provider asserted active (outputs IO-bound
   on the device), checks it against the PyTorch ensemble, and prints PyTorch-CUDA vs ORT-CUDA
   throughput at batch 1 and 256 (host array in, probabilities on the host out, for both).

Every stage runs as the user would run it (the CLI in a subprocess: a mixed precision is per
process). Under 8 minutes on one GPU; it stops at the first failure with the reason, and exits at
once when there is no GPU. ``--device cpu`` is the dry run of the same logic on a smaller slice
(the CPU execution provider; fp16 then trains without a grad scaler), which the tests run.

    python benchmarks/gpu_check.py                  # on a machine with a GPU and onnxruntime-gpu
    python benchmarks/gpu_check.py --device cpu     # the dry run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spinning thread pools

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "recipes" / "fmnist_tiny_edst.yaml"
PRECISIONS = ("bf16", "fp16")
# the dry run: a slice small enough for a 2-core CPU, with the same phases (two escapes)
DRY_RUN = ["max_train_samples=64", "val_size=16", "max_test_samples=64", "batch_size=16", "eval_batch_size=64"]
MIN_ACCURACY = {"cuda": 0.5, "cpu": 0.0}  # 10 classes, chance 0.1: the full tiny recipe reaches ~0.7; a dry run ~any


class CheckFailed(RuntimeError):
    """A stage of the check failed; the message says which and why."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the dry run")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--dataset", default=None, help="override the recipe's dataset (Hub id or folder)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per throughput measurement")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        _check_device(args.device)
        results = _run(args)
    except CheckFailed as err:
        print(f"\ngpu_check: FAILED after {time.perf_counter() - started:.0f} s: {err}", file=sys.stderr)
        return 1
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    (args.output_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\ngpu_check: PASSED on {results['device']} in {results['wall_time_s']:.0f} s")
    return 0


def _check_device(device: str) -> None:
    """Fail fast (before any training) when the GPU or ONNX Runtime's CUDA provider is missing."""
    import torch

    if device == "cpu":
        print("gpu_check: dry run on the CPU (the same stages on a smaller slice; no GPU numbers)")
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); `--device cpu` is the dry run"
        )
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(
            f"gpu_check: onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu instead of onnxruntime"
        )
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, onnxruntime {ort.__version__}")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: Path = args.output_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = (DRY_RUN if args.device == "cpu" else []) + ([f"dataset={args.dataset}"] if args.dataset else [])
    cut = _steps_before_second_refinement(overrides) + 2
    floor = MIN_ACCURACY[args.device]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    results: dict[str, Any] = {"device": device_name, "training": {}}
    for precision in PRECISIONS:
        results["training"][precision] = _train_cut_and_resume(out / precision, precision, overrides, cut, floor)
    model_dir = out / "bf16"
    dataset = args.dataset or _recipe_value(overrides, "dataset")
    results["evaluation"] = _evaluate(model_dir, dataset, out / "evaluation.json", floor)
    _cli("export", "onnx", str(model_dir))
    results["onnx"] = _onnx_vs_torch(model_dir, args.device, args.batch_sizes, args.min_run_time)
    return results


def _recipe_value(overrides: list[str], key: str) -> Any:
    from freetickets_hub.training.recipe import load_recipe

    return getattr(load_recipe(RECIPE, overrides), key)


def _steps_before_second_refinement(overrides: list[str]) -> int:
    """Optimizer steps of exploration + refinement 1: a cut just after this falls after the first escape."""
    import datasets

    from freetickets_hub.training.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    rows = datasets.load_dataset(recipe.dataset, recipe.dataset_config, split=recipe.train_split).num_rows
    train = min(rows - recipe.val_size, recipe.max_train_samples or rows)
    steps_per_epoch = train // recipe.batch_size  # one process, drop_last
    return steps_per_epoch * (recipe.explore_epochs + recipe.refine_epochs)


def _train_cut_and_resume(
    out: Path, precision: str, overrides: list[str], cut: int, min_accuracy: float
) -> dict[str, Any]:
    """Train, stop ``cut`` steps in (after the first escape), resume to the end; the summary's numbers."""
    sets = [*overrides, f"mixed_precision={precision}"]
    train = ["train", "--recipe", str(RECIPE), "--output-dir", str(out), *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    log = _cli(*train, "--max-steps", str(cut))
    if "forced escape" not in log:
        raise CheckFailed(f"{precision}: no forced escape in the first {cut} steps")
    if (out / "model.safetensors").exists() or not list((out / "checkpoints").glob("step_*")):
        raise CheckFailed(f"{precision}: --max-steps {cut} did not stop with a checkpoint")
    log = _cli(*train, "--resume")
    if "resuming from" not in log:
        raise CheckFailed(f"{precision}: --resume did not resume from the checkpoint")
    summary = json.loads((out / "train_summary.json").read_text())
    accuracy, nll = summary["test"]["ensemble"]["accuracy"], summary["test"]["ensemble"]["nll"]
    realised = summary["sparsity"]["realised"]
    if not (math.isfinite(nll) and accuracy > min_accuracy and all(abs(s - 0.8) < 2e-3 for s in realised)):
        raise CheckFailed(f"{precision}: accuracy {accuracy:.3f}, NLL {nll}, sparsity {realised}")
    row = {
        "accuracy": round(accuracy, 4),
        "nll": round(nll, 4),
        "total_steps": summary["total_steps"],
        "skipped_steps": summary.get("skipped_steps", 0),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"[train {precision}] cut at step {cut}, resumed: {row}")
    return row


def _evaluate(model_dir: Path, dataset: str, output: Path, min_accuracy: float) -> dict[str, Any]:
    _cli("evaluate", str(model_dir), "--dataset", dataset, "--max-samples", "1000", "--output", str(output))
    ensemble = json.loads(output.read_text())["ensemble"]
    if not (ensemble["accuracy"] > min_accuracy and math.isfinite(ensemble["nll"])):
        raise CheckFailed(f"evaluate: ensemble {ensemble}")
    print(f"[evaluate] ensemble accuracy {ensemble['accuracy']:.4f}, NLL {ensemble['nll']:.4f}")
    return {k: ensemble[k] for k in ("accuracy", "nll", "ece")}


def _onnx_vs_torch(model_dir: Path, device: str, batch_sizes: list[int], min_run_time: float) -> dict[str, Any]:
    """OnnxEnsemble on the device's provider (asserted active) against EnsembleModel on the device."""
    import numpy as np
    import torch
    from torch.utils.benchmark import Timer

    from freetickets_hub import EnsembleModel, OnnxEnsemble

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    engine = OnnxEnsemble.from_pretrained(model_dir, providers=[provider])  # raises when it is not active
    if engine.providers[0] != provider:
        raise CheckFailed(f"OnnxEnsemble runs on {engine.providers}, not {provider}")
    model = EnsembleModel.from_pretrained(model_dir).to(device).eval()
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((8, *engine.input_shape)).astype(np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(probe).to(device)).probs.float().cpu().numpy()
    difference = float(np.abs(engine(probe)["probs"] - reference).max())
    if difference > 1e-3:
        raise CheckFailed(f"ORT and PyTorch probabilities differ by {difference:.2e} (> 1e-3)")
    print(f"[onnx] providers {engine.providers}; max |probs ORT - PyTorch| = {difference:.2e}")

    @torch.inference_mode()
    def run_torch(images: np.ndarray) -> np.ndarray:  # host in, host out, as OnnxEnsemble
        return model(torch.from_numpy(images).to(device)).probs.cpu().numpy()

    rows = []
    print(f"{'batch':>6} {'torch img/s':>12} {'ORT img/s':>12} {'ORT / torch':>12}")
    for batch in batch_sizes:
        images = rng.standard_normal((batch, *engine.input_shape)).astype(np.float32)
        seconds = {}
        for name, fn in (("torch", run_torch), ("ort", engine)):
            fn(images)  # warm-up (cuDNN autotuning, ORT arena growth)
            timer = Timer(stmt="fn(images)", globals={"fn": fn, "images": images})
            seconds[name] = timer.blocked_autorange(min_run_time=min_run_time).median
        torch_rate, ort_rate = batch / seconds["torch"], batch / seconds["ort"]
        print(f"{batch:>6} {torch_rate:>12.0f} {ort_rate:>12.0f} {ort_rate / torch_rate:>12.2f}")
        rows.append({"batch": batch, "torch_images_per_s": torch_rate, "ort_images_per_s": ort_rate})
    return {"provider": provider, "max_abs_diff_probs": difference, "throughput": rows}


def _cli(*args: str) -> str:
    """Run ``python -m freetickets_hub.cli ARGS`` from the repository root; its output, or CheckFailed."""
    command = [sys.executable, "-m", "freetickets_hub.cli", *args]
    print(f"$ freetickets {' '.join(args)}", flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode:
        raise CheckFailed(f"`freetickets {' '.join(args)}` exited {result.returncode}:\n{output[-3000:]}")
    return output


if __name__ == "__main__":
    sys.exit(main())
