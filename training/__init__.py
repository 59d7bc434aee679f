"""DST / EDST training on accelerate (installed as ``freetickets_hub.training``)."""

from .recipe import Recipe, load_recipe
from .sparsity import SparseEngine, SparsityConfig
from .train import train

__all__ = ["Recipe", "SparseEngine", "SparsityConfig", "load_recipe", "train"]
