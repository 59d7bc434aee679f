"""``finetune --search-lr``: a few short runs on the validation carve, the best by validation NLL.

The grid scales the recipe's head LR by :data:`LR_FACTORS` and sets the backbone LR to each of
:data:`BACKBONE_RATIOS` of it (the backbone is frozen in a linear probe, so only the head LR varies
there). Each candidate trains every member for a fifth of the recipe's epochs (at least one), with no
warm-up, from the same seed; the test split is not read for the choice. Ties go to the earlier
candidate, so the pick is deterministic under the recipe's seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from freetickets_hub.errors import RecipeError
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.outputs import combine_member_logits

from .data import ImageData
from .finetune_recipe import FineTuneRecipe
from .summary import split_logits

__all__ = ["BACKBONE_RATIOS", "LR_FACTORS", "Candidate", "candidates", "pick", "search_recipe", "validation_nll"]

LR_FACTORS = (0.3, 1.0, 3.0)  # times the recipe's head LR
BACKBONE_RATIOS = (0.2, 1.0)  # backbone LR as a share of the head LR


@dataclass(frozen=True)
class Candidate:
    lr: float  # the new heads
    backbone_lr: float


def candidates(recipe: FineTuneRecipe) -> list[Candidate]:
    """The grid around ``recipe``'s LRs, in the order ties are broken."""
    if recipe.val_size <= 0:
        raise RecipeError("--search-lr picks on the validation carve: set val_size (e.g. --set val_size=200)")
    grid = []
    for factor in LR_FACTORS:
        lr = recipe.lr * factor
        if recipe.mode == "linear-probe":
            grid.append(Candidate(lr, min(recipe.backbone_lr, lr)))
        else:
            grid += [Candidate(lr, lr * ratio) for ratio in BACKBONE_RATIOS]
    return grid


def search_recipe(recipe: FineTuneRecipe, candidate: Candidate) -> FineTuneRecipe:
    """The short run that scores ``candidate``: a fifth of the epochs, no warm-up, one test image."""
    return dataclasses.replace(
        recipe,
        lr=candidate.lr,
        backbone_lr=candidate.backbone_lr,
        epochs=max(1, recipe.epochs // 5),
        warmup_epochs=0,
        max_test_samples=1,  # the summary needs a test split; the choice never reads it
        checkpoint_every=None,
    )


def validation_nll(model: EnsembleModel, data: ImageData, batch_size: int) -> float:
    """The ensemble's NLL (temperature 1) on the validation carve; ``inf`` when it diverged."""
    if data.val is None:
        raise RecipeError("--search-lr needs a validation carve (val_size > 0)")
    member_logits = torch.stack([split_logits(m, data.val, data, batch_size) for m in model.members])
    probs = combine_member_logits(member_logits, 1.0).probs
    picked = probs[torch.arange(len(data.val.labels)), data.val.labels]
    nll = -torch.log(picked.clamp_min(1e-12)).mean().item()
    return nll if math.isfinite(nll) else math.inf


def pick(scores: list[tuple[Candidate, float]]) -> Candidate:
    """The candidate with the lowest validation NLL (the first of equals)."""
    return min(scores, key=lambda item: item[1])[0]
