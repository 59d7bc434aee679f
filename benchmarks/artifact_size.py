"""Compact storage: an M-member sparse ensemble against ONE dense timm model saved as safetensors.

For each architecture, M members get ERK masks at sparsity S (``freetickets_hub.training.sparsity``)
and are saved with ``save_pretrained`` (fp32 and fp16 values); the baseline is one dense member of the
same architecture saved with ``safetensors.torch.save_file``. Targets (issue 4):

- bytes of the whole fp32 ensemble <= 0.72x one dense model; fp16 <= 0.42x;
- loading time per member (``EnsembleModel.from_pretrained`` / M) <= 1.2x loading the dense model
  (``timm.create_model`` + ``safetensors.torch.load_file`` + ``load_state_dict``).

Both loads run interleaved, ``--repeats`` times each, and the medians are compared. Torch runs on
``--threads`` threads (default 1): on a shared 2-core machine, more threads than idle cores makes every
small op wait for spinning workers and the timings meaningless.

    .venv/bin/python benchmarks/artifact_size.py [--archs cifar_wrn10_2 cifar_wrn16_4] [--repeats 21] [--threads 1]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from random_ensemble import random_sparse_ensemble  # benchmarks/ is on sys.path when run as a script
from safetensors.torch import load_file, save_file

from freetickets_hub import EnsembleModel

TARGETS = {"fp32 bytes": 0.72, "fp16 bytes": 0.42, "load / member": 1.2}


def load_dense(arch: str, path: Path) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, num_classes=10, in_chans=1)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def measure(arch: str, members: int, sparsity: float, repeats: int, root: Path) -> dict[str, float]:
    """Ratios to one dense model: bytes of the fp32 / fp16 ensemble, and load time per member."""
    ensemble = random_sparse_ensemble(arch, members, sparsity)
    ensemble.save_pretrained(root / "fp32", values_dtype="float32")
    ensemble.save_pretrained(root / "fp16", values_dtype="float16")
    dense_path = root / "dense.safetensors"
    save_file(timm.create_model(arch, num_classes=10, in_chans=1).state_dict(), str(dense_path))
    dense_bytes = dense_path.stat().st_size
    ensemble_times, dense_times = [], []
    for _ in range(repeats + 1):  # the first round warms caches and is dropped
        start = time.perf_counter()
        EnsembleModel.from_pretrained(root / "fp32")
        ensemble_times.append((time.perf_counter() - start) / members)
        start = time.perf_counter()
        load_dense(arch, dense_path)
        dense_times.append(time.perf_counter() - start)
    ensemble_ms = statistics.median(ensemble_times[1:]) * 1e3
    dense_ms = statistics.median(dense_times[1:]) * 1e3
    print(
        f"{arch}: dense {dense_bytes:,} B, load {dense_ms:.2f} ms | ensemble M={members} S={sparsity}: "
        f"fp32 {(root / 'fp32' / 'model.safetensors').stat().st_size:,} B, "
        f"fp16 {(root / 'fp16' / 'model.safetensors').stat().st_size:,} B, load {ensemble_ms:.2f} ms per member"
    )
    return {
        "fp32 bytes": (root / "fp32" / "model.safetensors").stat().st_size / dense_bytes,
        "fp16 bytes": (root / "fp16" / "model.safetensors").stat().st_size / dense_bytes,
        "load / member": ensemble_ms / dense_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["cifar_wrn10_2", "cifar_wrn16_4"])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    missed = False
    rows = []
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as tmp:
            ratios = measure(arch, args.members, args.sparsity, args.repeats, Path(tmp))
        for name, ratio in ratios.items():
            verdict = "PASS" if ratio <= TARGETS[name] else "MISS"
            missed |= verdict == "MISS"
            rows.append(f"{arch:<15} {name:<14} {ratio:>6.3f}x  (target <= {TARGETS[name]}x)  {verdict}")
    print("\n".join(rows))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
