"""Training recipes: one flat, strictly validated dataclass read from YAML, overridable with ``--set``.

A recipe is written by a person, so unlike a downloaded ``config.json`` it tolerates nothing: an
unknown key, a wrong type or an impossible value raises :class:`RecipeError` naming the key.
"""

from __future__ import annotations

import difflib
import itertools
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from freetickets_hub.errors import RecipeError

from .sparsity import SparsityConfig

__all__ = ["METHODS", "Recipe", "load_recipe", "parse_overrides"]

METHODS = ("edst", "dst", "dense", "dense_ensemble", "static_sparse")


@dataclass
class Recipe:
    """Everything a training run needs; each field can be overridden with ``--set key=value``."""

    # what to train
    method: str = "edst"  # edst | dst | dense | dense_ensemble | static_sparse
    architecture: str = "cifar_wrn10_2"  # any timm model name
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    num_members: int = 3  # M (dense: 1)
    seed: int = 0

    # data (any `datasets.load_dataset` source: Hub id or local folder)
    dataset: str = "../shared/datasets/fashion_mnist"
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None  # detected from the features when None
    label_column: str | None = None
    val_size: int = 5000  # carved from the train split with `seed`; used for ticket selection
    max_train_samples: int | None = None  # cap after the validation split is carved
    max_test_samples: int | None = None
    exclude_classes: list[str] = field(default_factory=list)  # label names held out of every split (near-OOD)
    augment: str = "pad_crop_flip"  # pad_crop_flip | crop | none (in-memory) | timm (ImageNet-style, streamed)
    pad: int = 2  # padding of the random crop
    image_size: int | None = None  # augment "timm": the square input size, e.g. 224
    auto_augment: str | None = None  # augment "timm": timm auto-augment policy, e.g. "rand-m9-mstd0.5"
    num_workers: int = 0  # DataLoader workers (augment "timm" decodes images in them)
    color_jitter: float = (
        0.0  # augment "timm": colour jitter strength (timm's default is 0.4; the paper's code has none)
    )

    # sparsity (see training/sparsity.py)
    sparsity: float = 0.8
    distribution: str = "erk"
    growth: str = "gradient"
    prune_rate: float = 0.5
    prune_rate_schedule: str = "constant"
    prune_rate_final: float = 0.005
    update_interval: int = 1000
    update_end: int | None = None
    escape_rate: float = 0.8
    escape_growth: str | None = None
    regrow_pruned: bool = True  # regrowth may pick the positions just pruned (official code, RigL)
    prune_rate_restart: str = "escape"  # cosine p restarts at each forced escape (official) | at every "phase"

    # schedule: dst/dense/static_sparse members train `epochs` each, LR x0.1 at each milestone;
    # edst explores for `explore_epochs` at `lr`, then M refinement phases of `refine_epochs`,
    # each stepping through `refine_lrs` at `refine_lr_milestones` (evenly when null)
    epochs: int = 10
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of `epochs`, in (0, 1)
    explore_epochs: int = 10
    refine_epochs: int = 5
    refine_lrs: list[float] = field(default_factory=lambda: [0.01, 0.001])
    refine_lr_milestones: list[float] | None = None  # fractions of `refine_epochs` where the next refine LR starts
    lr: float = 0.1
    warmup_epochs: int = 0
    ticket_selection: str = "last"  # last | best_val
    # SWA-style ticket: the mean of the last fraction of each ticket phase's iterates, masks frozen
    # there, BatchNorm recomputed on the training split (training/averaging.py); 0: the last iterate
    average_fraction: float = 0.0
    # CigL's random weight mask: drop this fraction of every maskable weight in each training
    # forward pass, on top of the DST mask; never at inference (training/random_mask.py); 0: off
    random_mask_rate: float = 0.0

    # optimisation
    batch_size: int = 128
    eval_batch_size: int = 500
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    filter_bias_and_bn: bool = False  # no weight decay on biases and norm parameters (the ImageNet code)
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    checkpoint_every: int | None = None  # steps between resumable checkpoints (phase ends always)

    def __post_init__(self) -> None:
        _check_types(self)
        choices = {
            "method": METHODS,
            "distribution": ("erk", "uniform"),
            "growth": ("gradient", "random"),
            "prune_rate_schedule": ("constant", "cosine"),
            "prune_rate_restart": ("escape", "phase"),
            "augment": ("pad_crop_flip", "crop", "none", "timm"),
            "ticket_selection": ("last", "best_val"),
            "mixed_precision": ("no", "bf16", "fp16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"recipe key {key!r} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.escape_growth not in (None, "gradient", "random"):
            raise RecipeError(
                f"recipe key 'escape_growth' must be gradient, random or null, got {self.escape_growth!r}"
            )
        for key in ("sparsity",):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise RecipeError(f"recipe key {key!r} must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 <= self.random_mask_rate < 1.0:
            raise RecipeError(f"recipe key 'random_mask_rate' must be in [0, 1), got {self.random_mask_rate}")
        for key in ("prune_rate", "prune_rate_final", "escape_rate", "average_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise RecipeError(f"recipe key {key!r} must be in [0, 1], got {getattr(self, key)}")
        positive = ("num_members", "update_interval", "batch_size", "eval_batch_size", "grad_accum_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise RecipeError(f"recipe key {key!r} must be at least 1, got {getattr(self, key)}")
        for key in ("epochs", "explore_epochs", "refine_epochs", "warmup_epochs", "val_size", "pad", "num_workers"):
            if getattr(self, key) < 0:
                raise RecipeError(f"recipe key {key!r} must not be negative, got {getattr(self, key)}")
        if self.lr <= 0:
            raise RecipeError(f"recipe key 'lr' must be positive, got {self.lr}")
        if self.method == "dense" and self.num_members != 1:
            raise RecipeError(f"method 'dense' trains one model; set num_members: 1 (got {self.num_members})")
        if self.method == "edst" and self.refine_epochs < 1:
            raise RecipeError("method 'edst' needs refine_epochs >= 1: each refinement phase yields one ticket")
        if self.method != "edst" and self.epochs < 1:
            raise RecipeError(f"method {self.method!r} needs epochs >= 1")
        if self.average_fraction and self.ticket_selection != "last":
            raise RecipeError(
                "recipe key 'average_fraction' averages the last iterates: it needs ticket_selection: last"
            )
        if not self.refine_lrs:
            raise RecipeError("recipe key 'refine_lrs' must list at least one learning rate")
        if len(set(self.exclude_classes)) != len(self.exclude_classes):
            raise RecipeError(f"recipe key 'exclude_classes' lists a class twice: {self.exclude_classes}")
        if self.color_jitter < 0:
            raise RecipeError(f"recipe key 'color_jitter' must not be negative, got {self.color_jitter}")
        _check_milestones("lr_milestones", self.lr_milestones, self.epochs, "epochs")
        if self.refine_lr_milestones is not None:
            _check_milestones("refine_lr_milestones", self.refine_lr_milestones, self.refine_epochs, "refine_epochs")
            if len(self.refine_lr_milestones) != len(self.refine_lrs) - 1:
                raise RecipeError(
                    f"recipe key 'refine_lr_milestones' needs one milestone per LR after the first "
                    f"({len(self.refine_lrs) - 1} for refine_lrs {self.refine_lrs}), got {self.refine_lr_milestones}"
                )

    @property
    def is_sparse(self) -> bool:
        return self.method in ("edst", "dst", "static_sparse")

    def sparsity_config(self) -> SparsityConfig:
        names = {f.name for f in fields(SparsityConfig)}
        return SparsityConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, *, cls: type[Any] = Recipe) -> Any:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``cls`` is the recipe dataclass to build (default :class:`Recipe`; fine-tuning has its own).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise RecipeError(f"recipe file {str(path)!r} does not exist") from err
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of keys to values")
        data = dict(loaded or {})
    data.update(parse_overrides(overrides or []))
    known = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    for item in overrides or []:  # YAML reads `no`/`off` as False: a string-typed key keeps the text
        key, _, value = item.partition("=")
        key = key.strip()
        string_key = key in hints and _runtime_types(hints[key]) in ((str,), (str, type(None)))
        if string_key and isinstance(data[key], (bool, int, float)):
            data[key] = value.strip()
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"unknown recipe key {key!r}{suggestion}")
    return cls(**data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["sparsity=0.9", "model_args={drop_rate: 0.1}"]`` -> typed values, parsed as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML: {err}") from err
    return out


def _check_milestones(key: str, milestones: list[float], epochs: int, epochs_key: str) -> None:
    """Milestones are fractions of a phase, strictly increasing in (0, 1): epochs (the paper's
    notation, e.g. [125, 187]) would otherwise silently never be reached."""
    if all(0.0 < m < 1.0 for m in milestones) and all(a < b for a, b in itertools.pairwise(milestones)):
        return
    hint = ""
    if epochs and any(m >= 1.0 for m in milestones) and all(0.0 < m < epochs for m in milestones):
        hint = (
            f"; for LR steps at epochs {milestones} of {epochs_key}={epochs} write {[m / epochs for m in milestones]}"
        )
    raise RecipeError(
        f"recipe key {key!r} must be strictly increasing fractions of {epochs_key!r} in (0, 1), got {milestones}{hint}"
    )


def _check_types(recipe: Any) -> None:
    hints = typing.get_type_hints(type(recipe))
    for f in fields(recipe):
        value = getattr(recipe, f.name)
        allowed = _runtime_types(hints[f.name])
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(recipe, f.name, float(value))  # YAML's `1` where a float is expected
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = ", ".join(t.__name__ for t in allowed)
            raise RecipeError(f"recipe key {f.name!r} must be of type {names}, got {value!r}")
        if list in allowed and isinstance(value, list):
            if _list_of_strings(hints[f.name]):
                if not all(isinstance(v, str) for v in value):
                    raise RecipeError(f"recipe key {f.name!r} must be a list of names, got {value!r}")
            elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise RecipeError(f"recipe key {f.name!r} must be a list of numbers, got {value!r}")


def _list_of_strings(hint: Any) -> bool:
    lists = [arg for arg in (typing.get_args(hint) or (hint,)) if typing.get_origin(arg) is list] or [hint]
    return typing.get_args(lists[0]) == (str,)


def _runtime_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    if hint is type(None):
        return (type(None),)
    return (origin or hint,)
