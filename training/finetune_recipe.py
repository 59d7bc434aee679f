"""Fine-tuning recipes: the keys shared with training recipes (data, augmentation, optimisation, the
prune/regrow rules of ``dst`` mode) come from :class:`~.recipe.RecipeBase`, checked there with the
same rules and messages; the rest (mode, head and backbone LRs, preprocessing overrides) here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.errors import RecipeError

from .recipe import Recipe, RecipeBase, load_recipe

__all__ = ["INTERPOLATIONS", "MODES", "FineTuneRecipe", "load_finetune_recipe", "resolve_pretrained_cfg"]

MODES = ("frozen-masks", "dst", "linear-probe")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct")


@dataclass
class FineTuneRecipe(RecipeBase):
    """Everything a fine-tuning run needs; each field can be overridden with ``--set key=value``.

    Each member trains ``epochs``, warm-up first, LR x0.1 at each milestone; ``seed + i`` seeds
    member i's new head, data order and augmentation.
    """

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {**RecipeBase.CHOICES, "mode": MODES}
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (*RecipeBase.AT_LEAST_ONE, "epochs")

    # what to fine-tune
    base_model: str | None = None  # a saved ensemble folder or a Hub id (the CLI's MODEL)
    revision: str | None = None  # Hub branch, tag or commit of base_model
    mode: str = "frozen-masks"  # frozen-masks | dst | linear-probe

    # preprocessing: null keeps the base model's pretrained_cfg value
    input_size: list[int] | None = None  # [channels, height, width]
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    # lr / backbone_lr: finetune_small.yaml's, from the seeded sweep in benchmarks/RESULTS.md
    backbone_lr: float = 0.03  # the backbone's LR, at most `lr` (unused in linear-probe)

    # the shared keys' fine-tuning defaults
    val_size: int = 0
    # No flips unless asked: the new task is unknown, and a mirror image is another class for digits,
    # text and many other tasks.
    augment: str = "crop"
    lr: float = 0.15  # the heads' LR
    warmup_epochs: int = 1
    lr_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
    prune_rate: float = 0.2  # dst mode: gentler than training's, on trained masks
    update_interval: int = 100
    weight_decay: float = 1e-4

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.backbone_lr <= self.lr:
            raise RecipeError(
                f"recipe key 'backbone_lr' must be in [0, lr={self.lr}] (the backbone learns slower than "
                f"the new heads), got {self.backbone_lr}"
            )
        if self.input_size is not None and (len(self.input_size) != 3 or not all(v >= 1 for v in self.input_size)):
            raise RecipeError(f"recipe key 'input_size' must be [channels, height, width], got {self.input_size}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and self.input_size is not None and len(values) != self.input_size[0]:
                channels = self.input_size[0]
                raise RecipeError(f"recipe key {key!r} needs one value per channel ({channels}), got {values}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise RecipeError(f"recipe key 'std' must be positive, got {self.std}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise RecipeError(f"recipe key 'interpolation' must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise RecipeError(f"recipe key 'crop_pct' must be in (0, 1], got {self.crop_pct}")

    def training_recipe(self, base: EnsembleConfig, *, sparse: bool) -> Recipe:
        """The recipe the training loop runs: one run per member (seed + i), one phase each.

        ``frozen-masks`` and ``linear-probe`` run as ``static_sparse`` (no mask updates), ``dst`` as
        ``dst``; a dense base model runs as ``dense`` / ``dense_ensemble``.
        """
        members = base.ensemble.num_members
        if not sparse:
            if self.mode == "dst":
                raise RecipeError("mode 'dst' needs a sparse base model; this one is dense (use frozen-masks)")
            method = "dense" if members == 1 else "dense_ensemble"
        else:
            method = "dst" if self.mode == "dst" else "static_sparse"
        size = self.input_size or base.pretrained_cfg.get("input_size")
        if self.augment == "timm" and not size:
            raise RecipeError("augment 'timm' needs `input_size` in the recipe: the base model's config has none")
        shared = {f.name: getattr(self, f.name) for f in fields(RecipeBase)}
        return Recipe(
            **{**shared, "dataset": self.dataset or ""},  # the callers refuse a recipe without a dataset
            method=method,
            architecture=base.architecture,
            model_args=dict(base.model_args),
            num_members=members,
            sparsity=base.ensemble.sparsity if sparse else 0.0,
            distribution=base.ensemble.distribution if base.ensemble.distribution != "dense" else "erk",
            image_size=int(size[1]) if size else None,
        )


def load_finetune_recipe(path: str | Path | None, overrides: list[str] | None = None, **values: Any) -> FineTuneRecipe:
    """Read a fine-tuning recipe (defaults when ``path`` is None), apply ``--set`` overrides, then
    ``values`` that are not None (the CLI's MODEL, ``--dataset``, ``--mode``, ``--revision``)."""
    recipe = load_recipe(path, overrides, cls=FineTuneRecipe)
    return dataclasses.replace(recipe, **{k: v for k, v in values.items() if v is not None})


def resolve_pretrained_cfg(recipe: FineTuneRecipe, base: EnsembleConfig, num_classes: int) -> dict[str, Any]:
    """The base model's ``pretrained_cfg`` with the recipe's overrides (timm keeps it the same way)."""
    cfg = {**base.pretrained_cfg, "num_classes": num_classes}
    cfg.update({k: getattr(recipe, k) for k in _PREPROCESSING if getattr(recipe, k) is not None})
    if "input_size" not in cfg:
        raise RecipeError("the base model's config has no pretrained_cfg.input_size: set `input_size` in the recipe")
    channels = cfg["input_size"][0]
    if channels != base.in_chans:
        raise RecipeError(f"input_size has {channels} channels, the base model takes {base.in_chans}")
    for key, default in (("mean", 0.0), ("std", 1.0)):
        values = list(cfg.get(key) or [default] * channels)
        if len(values) != channels:
            raise RecipeError(f"{key} {values} does not have one value per channel ({channels}); set it in the recipe")
        cfg[key] = values
    cfg.setdefault("crop_pct", 1.0)
    cfg.setdefault("interpolation", "bilinear")
    return cfg
