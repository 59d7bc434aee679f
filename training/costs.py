"""Training and inference costs in FLOPs, by the RigL convention.

Dense layer FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one image; a sparse
layer costs its dense FLOPs times its density. A training step costs 3x the (sparse) forward pass,
and a step that needs a dense gradient (gradient growth, once every ΔT) costs the dense weight
gradient on top: ``2·f_sparse + f_dense`` instead of ``3·f_sparse``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .sparsity import maskable_weights

__all__ = ["LayerFlops", "forward_flops", "layer_flops", "training_flops"]


@dataclass
class LayerFlops:
    """Forward FLOPs of one image: per maskable weight, and the rest (pooling, matmuls outside layers)."""

    per_weight: dict[str, int]
    other: int

    @property
    def dense(self) -> int:
        return sum(self.per_weight.values()) + self.other

    def sparse(self, densities: Mapping[str, float]) -> float:
        """Forward FLOPs when weight ``name`` keeps ``densities[name]`` of its entries (default 1)."""
        return sum(f * densities.get(n, 1.0) for n, f in self.per_weight.items()) + self.other


def layer_flops(model: nn.Module, input_size: tuple[int, ...]) -> LayerFlops:
    """Count one image's forward FLOPs per conv/linear weight of ``model``."""
    modules = {name.removesuffix(".weight"): name for name in maskable_weights(model)}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    counts = counter.get_flop_counts()  # keyed by "<ModelClass>.<module path>"
    root = type(model).__name__
    per_weight = {weight: int(sum(counts.get(f"{root}.{module}", {}).values())) for module, weight in modules.items()}
    total = int(counter.get_total_flops())
    return LayerFlops(per_weight, total - sum(per_weight.values()))


def forward_flops(model: nn.Module, input_size: tuple[int, ...], masks: Mapping[str, torch.Tensor]) -> float:
    """One image's forward FLOPs of ``model`` with ``masks`` applied (dense layers have no mask)."""
    flops = layer_flops(model, input_size)
    densities = {name: mask.float().mean().item() for name, mask in masks.items()}
    return flops.sparse(densities)


def training_flops(f_sparse: float, f_dense: float, images: int, dense_gradient_images: int) -> float:
    """RigL's training cost: ``3·f_sparse`` per image, plus ``f_dense - f_sparse`` per image whose
    batch also computed the dense weight gradient (gradient growth and the escape's probe)."""
    return 3 * f_sparse * images + (f_dense - f_sparse) * dense_gradient_images
