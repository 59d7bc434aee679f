"""Helpers for the Hub-artifact tests: tiny sparse ensembles and a Hub cache layout (imported explicitly)."""

from __future__ import annotations

import shutil
from pathlib import Path

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.training.random_ensemble import random_sparse_ensemble

__all__ = ["INPUT", "LABELS", "make_ensemble", "put_in_hub_cache", "tiny_config"]

LABELS = [f"class_{i}" for i in range(10)]
INPUT = (1, 28, 28)


def tiny_config(
    *, members: int = 3, method: str = "edst", sparsity: float = 0.8, **overrides: object
) -> EnsembleConfig:
    """The Fashion-MNIST recipe's shape on the smallest WRN: 1x28x28 inputs, 10 classes."""
    data = {
        "architecture": "cifar_wrn10_2",
        "num_classes": 10,
        "model_args": {"in_chans": 1},
        "label_names": list(LABELS),
        "pretrained_cfg": {
            "input_size": list(INPUT),
            "mean": [0.5],
            "std": [0.5],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
        "ensemble": {"num_members": members, "sparsity": sparsity, "method": method, "distribution": "erk"},
    }
    data.update(overrides)
    return EnsembleConfig.from_dict(data)


def make_ensemble(seed: int = 0, **config: object) -> EnsembleModel:
    """A random ensemble with exact-count ERK masks applied and non-trivial batch-norm statistics."""
    return random_sparse_ensemble(tiny_config(**config), seed=seed, batchnorm_stats=True)


def put_in_hub_cache(folder: Path, cache_dir: Path, repo_id: str, commit: str, *, main: bool = True) -> Path:
    """Copy ``folder`` into the Hub cache layout as snapshot ``commit`` of ``repo_id`` (``refs/main`` too)."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot
