"""DST / EDST training on accelerate (installed as ``freetickets_hub.training``)."""

from .finetune import FineTuneRecipe, finetune, load_finetune_recipe
from .recipe import Recipe, load_recipe
from .sparsity import SparseEngine, SparsityConfig
from .train import train

__all__ = [
    "FineTuneRecipe",
    "Recipe",
    "SparseEngine",
    "SparsityConfig",
    "finetune",
    "load_finetune_recipe",
    "load_recipe",
    "train",
]
