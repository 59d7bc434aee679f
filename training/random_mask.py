"""CigL-style random weight mask (DropConnect) on top of the DST mask, during training only.

Each training forward pass sees every maskable weight multiplied by a fresh Bernoulli keep-mask
that drops the fraction ``rate`` of it (recipe key ``random_mask_rate``). The weights themselves are
never changed: the forward runs through ``torch.func.functional_call`` with the dropped weights
substituted, so the dropped positions get zero gradient, evaluation and the saved artifact see the
plain DST-masked weights, and nothing enters a checkpoint. The keep-mask is drawn from a generator
seeded by (member seed, global step, batch), never from process RNG, so every DDP process draws the
same mask and a resumed run draws the masks it would have drawn.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .sparsity import maskable_weights

__all__ = ["forward_with_random_mask", "keep_masks"]


def keep_masks(model: nn.Module, rate: float, seed: int) -> dict[str, torch.Tensor]:
    """Bernoulli(1 - ``rate``) keep-masks for ``model``'s maskable weights, determined by ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(w.shape, generator=generator) >= rate).to(w.device)
        for name, w in maskable_weights(model).items()
    }


def forward_with_random_mask(model: nn.Module, inputs: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """``model(inputs)`` with the fraction ``rate`` of every maskable weight dropped for this pass only."""
    if rate <= 0:
        return model(inputs)
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel)  # go through DDP's forward: gradients sync
    inner, prefix = (model.module, "module.") if wrapped else (model, "")
    weights = maskable_weights(inner)
    masked = {prefix + name: weights[name] * keep for name, keep in keep_masks(inner, rate, seed).items()}
    return functional_call(model, masked, (inputs,), strict=False)
