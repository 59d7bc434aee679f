"""Inference throughput: the one-graph ONNX ensemble against the ways PyTorch code runs an ensemble.

All engines run in one process on the same inputs (preprocessed photo-like scenes), in blocks of
repeats with a pause between blocks (interleaving them call by call would let one engine's spinning
thread pool steal the cores of the next), over several passes; each time is the median of all repeats.

- ``dense member (torch)``: one member alone, the cost of a single model;
- ``naive loop (torch)``: for each member forward, softmax, then average (how reference code does it);
- ``EnsembleModel (torch)``: our torch engine (all DESIGN.md outputs);
- ``OnnxEnsemble``: the exported graph on ONNX Runtime (all outputs, input checks included);
- ``ensemble graph (ORT)``: the same graph through a bare ``InferenceSession`` (no input checks);
- ``member graph (ORT)``: one member exported alone, to price the ensemble graph's overhead.

Targets (issue 6, Fashion-MNIST recipe model: cifar_wrn10_2, 1x28x28, M=3, 80 % ERK masks, 2 threads):
OnnxEnsemble >= 1.3x the naive loop's images/s at batch 64 and >= 3x at batch 1; the ensemble graph
costs <= 1.05 x M x the member graph. ``--device cuda`` runs the same on a GPU (ORT CUDA provider with
IO binding; torch CUDA), numpy in and numpy out for both, so host-device copies count alike.

    .venv/bin/python benchmarks/inference.py [--model DIR] [--device cpu|cuda] [--threads 2]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from random_ensemble import random_sparse_ensemble  # benchmarks/ is on sys.path when run as a script

from freetickets_hub import EnsembleModel, OnnxEnsemble
from freetickets_hub.export import export_onnx
from freetickets_hub.export.verify import synthetic_images
from freetickets_hub.preprocessing import preprocess

TARGET_VS_NAIVE = {1: 3.0, 64: 1.3}  # OnnxEnsemble images/s over the naive torch loop's, by batch size
TARGET_OVERHEAD = 1.05  # ensemble graph time <= this x M x member graph time


def export_member(member: torch.nn.Module, input_size: list[int], path: Path) -> None:
    """One member alone as an ONNX graph (logits only, dynamic batch), the unit of the overhead target."""
    example = torch.zeros(2, *input_size, device=next(member.parameters()).device)
    dims = {"pixel_values": {0: torch.export.Dim("batch")}}

    class _Member(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.member = member

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.member(pixel_values)

    program = torch.onnx.export(_Member().eval(), (example,), dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(str(path), external_data=False)


def time_engines(
    engines: dict[str, Callable[[], object]], seconds: float, passes: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each engine: ``passes`` passes over the engines, each a block of repeats.

    A block runs one engine alone after a pause, so the previous engine's spinning thread pool
    (OpenMP, ORT) has gone idle; several passes spread slow drifts of the machine's load over all.
    """
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(passes):
        for name, fn in engines.items():
            time.sleep(0.5)
            for _ in range(3):  # warm-up
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            repeats = max(3, min(300, int(seconds / passes / max(time.perf_counter() - start, 1e-6))))
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a saved ensemble folder (default: random WRN-10-2, M=3, S=0.8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="rough time budget per engine and batch size")
    parser.add_argument("--passes", type=int, default=3, help="passes over the engines (medians pool all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="freetickets-bench-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> int:
    """Export the graphs into ``work``, time every engine, print the table and PASS/MISS; 1 if any MISS."""
    torch.set_num_threads(args.threads)
    model = EnsembleModel.from_pretrained(args.model) if args.model else random_sparse_ensemble()
    device = torch.device(args.device)
    model = model.to(device).eval()
    cfg = model.config.pretrained_cfg
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    export_onnx(model.cpu(), work)  # verified against PyTorch before it is timed
    model.to(device)
    export_member(model.members[0], cfg["input_size"], work / "member.onnx")
    engine = OnnxEnsemble.from_pretrained(work, providers=providers, session_options=options)
    graph_session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), options, providers=providers)
    member_session = ort.InferenceSession(str(work / "member.onnx"), options, providers=providers)
    print(f"device {args.device}, threads {args.threads}, providers {engine.providers}, members {model.num_members}")
    print("load average before timing (shared cores): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    pixels = preprocess(synthetic_images(cfg, max(args.batch_sizes), seed=0), cfg)
    missed = 0
    for batch_size in args.batch_sizes:
        batch = pixels[:batch_size]
        tensor = torch.from_numpy(batch)

        @torch.inference_mode()
        def dense_member(x: torch.Tensor = tensor) -> np.ndarray:
            return torch.softmax(model.members[0](x.to(device)), -1).cpu().numpy()

        @torch.inference_mode()
        def naive_loop(x: torch.Tensor = tensor) -> np.ndarray:
            x = x.to(device)
            probs = [torch.softmax(member(x), -1) for member in model.members]
            return (sum(probs) / len(probs)).cpu().numpy()

        @torch.inference_mode()
        def ensemble_model(x: torch.Tensor = tensor) -> np.ndarray:
            return model(x.to(device)).probs.cpu().numpy()

        engines = {
            "dense member (torch)": dense_member,
            "naive loop (torch)": naive_loop,
            "EnsembleModel (torch)": ensemble_model,
            "OnnxEnsemble": lambda x=batch: engine(x),
            "ensemble graph (ORT)": lambda x=batch: graph_session.run(None, {"pixel_values": x}),
            "member graph (ORT)": lambda x=batch: member_session.run(None, {"pixel_values": x}),
        }
        timed = time_engines(engines, args.seconds, args.passes, sync)
        seconds = {name: statistics.median(values) for name, values in timed.items()}
        naive = seconds["naive loop (torch)"]
        print(f"\nbatch {batch_size} (median of the repeats)")
        print(f"{'engine':<24} {'ms/batch':>10} {'images/s':>10} {'vs naive':>9} {'repeats':>8}")
        for name, value in seconds.items():
            repeats = len(timed[name])
            print(f"{name:<24} {value * 1e3:>10.3f} {batch_size / value:>10.1f} {naive / value:>8.2f}x {repeats:>8}")
        if batch_size in TARGET_VS_NAIVE:
            speedup, target = naive / seconds["OnnxEnsemble"], TARGET_VS_NAIVE[batch_size]
            missed += speedup < target
            verdict = "PASS" if speedup >= target else "MISS"
            print(f"{verdict} OnnxEnsemble vs naive loop {speedup:.2f}x (target >= {target}x)")
        overhead = seconds["ensemble graph (ORT)"] / (model.num_members * seconds["member graph (ORT)"])
        missed += overhead > TARGET_OVERHEAD
        print(
            f"{'PASS' if overhead <= TARGET_OVERHEAD else 'MISS'} ensemble graph / (M x member graph) "
            f"{overhead:.3f} (target <= {TARGET_OVERHEAD})"
        )
    print("load average after timing: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
