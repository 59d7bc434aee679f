"""A randomly initialised ensemble of the Fashion-MNIST recipe's shape with exact-count ERK masks.

Shared by the benchmarks that measure an artifact or an engine rather than a trained model.
"""

from __future__ import annotations

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.training.random_ensemble import random_sparse_ensemble as _random_sparse_ensemble

__all__ = ["random_sparse_ensemble"]


def random_sparse_ensemble(
    arch: str = "cifar_wrn10_2", members: int = 3, sparsity: float = 0.8, seed: int = 0
) -> EnsembleModel:
    """1x28x28 inputs, 10 classes, ``members`` freshly initialised members with random ERK masks applied."""
    config = EnsembleConfig(
        arch,
        10,
        model_args={"in_chans": 1},
        pretrained_cfg={"input_size": [1, 28, 28], "mean": [0.2860], "std": [0.3530], "crop_pct": 1.0},
        ensemble={"num_members": members, "sparsity": sparsity, "distribution": "erk"},
    )
    return _random_sparse_ensemble(config, seed=seed)
