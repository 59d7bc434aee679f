"""An untrained ensemble with random sparse masks: the one builder tests and benchmarks share.

Benchmarks that measure an artifact or an engine (size, export, throughput) and tests of the
artifact, the runtimes and the evaluation need an ensemble of a given shape, not a trained one.
"""

from __future__ import annotations

import torch

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.model.ensemble import EnsembleModel

from .sparsity import random_masks

__all__ = ["random_sparse_ensemble"]


def random_sparse_ensemble(
    config: EnsembleConfig, *, seed: int = 0, logit_spread: float | None = None, batchnorm_stats: bool = False
) -> EnsembleModel:
    """Freshly initialised members of ``config`` with exact-count random masks applied.

    The masks follow ``config.ensemble`` (sparsity, distribution); a dense config gets none.

    Args:
        config: the ensemble's shape (architecture, classes, input size, members, sparsity).
        seed: seeds the weights, the masks and every other draw.
        logit_spread: scale each member's classifier so that its logits vary with the input by
            about this much (their std over random inputs); at initialisation every probability is
            close to 1/K, which would hide errors in what consumes them.
        batchnorm_stats: draw non-trivial BatchNorm running statistics (means ~ N(0, 0.1²),
            variances ~ U(0.5, 1.5)), so that eval-mode normalisation is exercised.
    """
    torch.manual_seed(seed)
    model = EnsembleModel(config)
    generator = torch.Generator().manual_seed(seed)
    info = config.ensemble
    for index, member in enumerate(model.members):
        masks = random_masks(member, info.sparsity, info.distribution, generator) if info.sparsity else {}
        state = {name: t * masks[name] if name in masks else t.clone() for name, t in member.state_dict().items()}
        if batchnorm_stats:
            for name, tensor in state.items():
                if name.endswith("running_mean"):
                    tensor.normal_(0.0, 0.1, generator=generator)
                elif name.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5, generator=generator)
        model.load_member(index, state, masks)
        if logit_spread is not None:
            probe = torch.randn(64, *config.pretrained_cfg["input_size"], generator=generator)
            with torch.no_grad():
                logits = member.eval()(probe)
                scale = logit_spread / (logits - logits.mean(0)).std()
                head = member.get_classifier()
                head.weight *= scale
                if head.bias is not None:  # centred too: random ReLU features share a large input-independent part
                    head.bias.copy_(scale * (head.bias - logits.mean(0)))
    return model
