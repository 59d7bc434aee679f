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
from typing import Any, ClassVar

import yaml

from freetickets_hub.artifact.config import METHODS as ENSEMBLE_METHODS
from freetickets_hub.errors import RecipeError

from .sparsity import SparsityConfig

__all__ = ["METHODS", "SPARSE_METHODS", "Recipe", "RecipeBase", "load_recipe", "parse_overrides"]

METHODS = tuple(m for m in ENSEMBLE_METHODS if m != "merged")  # a merged ensemble comes from `freetickets merge`
SPARSE_METHODS = ("edst", "dst", "static_sparse")
_SPARSE = SparsityConfig()  # the mask rules' defaults, declared once in training/sparsity.py


@dataclass
class RecipeBase:
    """The keys training and fine-tuning recipes share, checked here once for both.

    A recipe class adds its own keys, extends the rule tables below (one line per new key) and its
    cross-key rules in :meth:`check`; a subclass redeclares a shared key only to change its default.
    """

    # rules on one key each: allowed values, or ranges; messages name the key
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "augment": ("pad_crop_flip", "crop", "none", "timm"),
        "ticket_selection": ("last", "best_val"),
        "mixed_precision": ("no", "bf16", "fp16"),
        "growth": ("gradient", "random"),
        "prune_rate_schedule": ("constant", "cosine"),
    }
    BELOW_ONE: ClassVar[tuple[str, ...]] = ()  # in [0, 1)
    UP_TO_ONE: ClassVar[tuple[str, ...]] = ("prune_rate", "prune_rate_final")  # in [0, 1]
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = ("update_interval", "batch_size", "eval_batch_size", "grad_accum_steps")
    NOT_NEGATIVE: ClassVar[tuple[str, ...]] = (
        "epochs",
        "warmup_epochs",
        "val_size",
        "pad",
        "num_workers",
        "color_jitter",
    )

    seed: int = 0

    # data (any `datasets.load_dataset` source: Hub id or local folder)
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None  # detected from the features when None
    label_column: str | None = None
    val_size: int = 5000  # carved from the train split with `seed` (ticket selection, calibration)
    max_train_samples: int | None = None  # cap after the validation split is carved
    max_test_samples: int | None = None
    augment: str = "pad_crop_flip"  # pad_crop_flip | crop | none (in-memory) | timm (ImageNet-style, streamed)
    pad: int = 2  # padding of the random crop
    auto_augment: str | None = None  # augment "timm": timm auto-augment policy, e.g. "rand-m9-mstd0.5"
    # augment "timm": colour jitter strength (timm's default is 0.4; the paper's code has none)
    color_jitter: float = 0.0
    num_workers: int = 0  # DataLoader workers (augment "timm" decodes images in them)

    # schedule: each member (or DST run) trains `epochs`, LR x0.1 at each milestone
    epochs: int = 10
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of `epochs`, in (0, 1)
    lr: float = 0.1
    warmup_epochs: int = 0
    ticket_selection: str = "last"  # last | best_val

    # prune and regrow (training/sparsity.py); fine-tuning uses them in its dst mode
    growth: str = _SPARSE.growth
    prune_rate: float = _SPARSE.prune_rate
    prune_rate_schedule: str = _SPARSE.prune_rate_schedule
    prune_rate_final: float = _SPARSE.prune_rate_final
    update_interval: int = _SPARSE.update_interval
    regrow_pruned: bool = _SPARSE.regrow_pruned  # regrowth may pick the positions just pruned (official code, RigL)

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
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"recipe key {key!r} must be one of {allowed}, got {getattr(self, key)!r}")
        for keys, inside, interval in (
            (self.BELOW_ONE, lambda v: 0.0 <= v < 1.0, "[0, 1)"),
            (self.UP_TO_ONE, lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
        ):
            for key in keys:
                if not inside(getattr(self, key)):
                    raise RecipeError(f"recipe key {key!r} must be in {interval}, got {getattr(self, key)}")
        for key in self.AT_LEAST_ONE:
            if getattr(self, key) < 1:
                raise RecipeError(f"recipe key {key!r} must be at least 1, got {getattr(self, key)}")
        for key in self.NOT_NEGATIVE:
            if getattr(self, key) < 0:
                raise RecipeError(f"recipe key {key!r} must not be negative, got {getattr(self, key)}")
        if self.lr <= 0:
            raise RecipeError(f"recipe key 'lr' must be positive, got {self.lr}")
        _check_milestones("lr_milestones", self.lr_milestones, self.epochs, "epochs")
        self.check()

    def check(self) -> None:
        """Rules across keys; a subclass adds its own and calls ``super().check()``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recipe(RecipeBase):
    """Everything a training run needs; each field can be overridden with ``--set key=value``."""

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **RecipeBase.CHOICES,
        "method": METHODS,
        "distribution": ("erk", "uniform"),
        "prune_rate_restart": ("escape", "phase"),
        "escape_growth": (None, "gradient", "random"),
        "structure": ("unstructured", "channel"),
        "channel_criterion": ("umm", "ablation"),
        "channel_allocation": ("global", "uniform"),
    }
    BELOW_ONE: ClassVar[tuple[str, ...]] = ("sparsity", "random_mask_rate", "channel_sparsity")
    UP_TO_ONE: ClassVar[tuple[str, ...]] = (
        *RecipeBase.UP_TO_ONE,
        "escape_rate",
        "average_fraction",
        "channel_start",
        "channel_end",
        "channel_floor",
    )
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (*RecipeBase.AT_LEAST_ONE, "num_members", "channel_multiple")
    NOT_NEGATIVE: ClassVar[tuple[str, ...]] = (*RecipeBase.NOT_NEGATIVE, "explore_epochs", "refine_epochs")

    # what to train
    method: str = "edst"  # edst | dst | dense | dense_ensemble | narrow_dense_ensemble | static_sparse
    architecture: str = "cifar_wrn10_2"  # any timm model name
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    num_members: int = 3  # M (dense: 1)

    # data
    dataset: str = "../shared/datasets/fashion_mnist"
    exclude_classes: list[str] = field(default_factory=list)  # label names held out of every split (near-OOD)
    image_size: int | None = None  # augment "timm": the square input size, e.g. 224

    # sparsity (see training/sparsity.py)
    sparsity: float = _SPARSE.sparsity
    distribution: str = _SPARSE.distribution
    update_end: int | None = _SPARSE.update_end
    escape_rate: float = _SPARSE.escape_rate
    escape_growth: str | None = _SPARSE.escape_growth
    prune_rate_restart: str = "escape"  # cosine p restarts at each forced escape (official) | at every "phase"

    # schedule: dst/dense/static_sparse members train `epochs` each (the shared keys);
    # edst explores for `explore_epochs` at `lr`, then M refinement phases of `refine_epochs`,
    # each stepping through `refine_lrs` at `refine_lr_milestones` (evenly when null)
    explore_epochs: int = 10
    refine_epochs: int = 5
    refine_lrs: list[float] = field(default_factory=lambda: [0.01, 0.001])
    refine_lr_milestones: list[float] | None = None  # fractions of `refine_epochs` where the next refine LR starts
    # SWA-style ticket: the mean of the last fraction of each ticket phase's iterates, masks frozen
    # there, BatchNorm recomputed on the training split (training/averaging.py); 0: the last iterate
    average_fraction: float = 0.0
    # Sup-tickets-style cyclic LR over that window: this many cycles, each from `average_cycle_lr`
    # (null: 10x the window's own LR) down to the window's own LR; the ticket averages the iterates
    # at the cycles' ends only; 0: every iterate at the phase's own LR
    average_cycles: int = 0
    average_cycle_lr: float | None = None
    # CigL's random weight mask: drop this fraction of every maskable weight in each training
    # forward pass, on top of the DST mask; never at inference (training/random_mask.py); 0: off
    random_mask_rate: float = 0.0

    # channel_sparsity: the share of the full model's channels each member ends without, counts rounded
    # to `channel_multiple`. narrow_dense_ensemble (Packed-Ensembles with gamma=1, Laurent et al. 2023):
    # M dense members built at that width from the start (training/channel_sparsity.py: `narrow_widths`).
    # structure: channel (Chase, Yin et al. 2023; dst and edst): every ticket phase removes channels on a
    # cubic schedule from `channel_start` to `channel_end` (fractions of the phase), lowest `channel_criterion`
    # first (umm: mean |w| of the filters, zeros included; ablation: share of the filters' weights the DST
    # mask keeps, SRigL's salient count), each layer keeping at least `channel_floor` of its channels;
    # `channel_allocation` global (one threshold, Chase) or uniform; the ticket is stored physically slim
    # (training/channel_training.py)
    structure: str = "unstructured"
    channel_sparsity: float = 0.0
    channel_multiple: int = 16
    channel_start: float = 0.0
    channel_end: float = 0.75
    channel_floor: float = 0.25
    channel_criterion: str = "umm"
    channel_allocation: str = "global"

    def check(self) -> None:
        super().check()
        if self.method == "dense" and self.num_members != 1:
            raise RecipeError(f"method 'dense' trains one model; set num_members: 1 (got {self.num_members})")
        if self.method == "edst" and self.refine_epochs < 1:
            raise RecipeError("method 'edst' needs refine_epochs >= 1: each refinement phase yields one ticket")
        if self.method != "edst" and self.epochs < 1:
            raise RecipeError(f"method {self.method!r} needs epochs >= 1")
        narrow = self.method == "narrow_dense_ensemble"
        if narrow and not self.channel_sparsity > 0:
            raise RecipeError("method 'narrow_dense_ensemble' needs channel_sparsity in (0, 1), e.g. 0.5: half width")
        channel = self.structure == "channel"
        if channel and self.method not in ("dst", "edst"):
            raise RecipeError(f"structure 'channel' needs method 'dst' or 'edst' (got {self.method!r})")
        if channel and not self.channel_sparsity > 0:
            raise RecipeError("structure 'channel' needs channel_sparsity in (0, 1), e.g. 0.5: half the channels")
        if self.channel_sparsity and not (narrow or channel):
            raise RecipeError(
                "recipe key 'channel_sparsity' is read by method 'narrow_dense_ensemble' and structure 'channel' "
                f"only (got method {self.method!r}, structure {self.structure!r})"
            )
        if channel and not self.channel_start < self.channel_end:
            raise RecipeError(
                f"recipe key 'channel_end' ({self.channel_end}) must come after 'channel_start' ({self.channel_start})"
            )
        if channel and not self.channel_floor > 0:
            raise RecipeError(f"recipe key 'channel_floor' must be in (0, 1], got {self.channel_floor}")
        if channel and self.average_fraction and self.channel_end > 1.0 - self.average_fraction:
            raise RecipeError(
                f"recipe key 'channel_end' ({self.channel_end}) must end before the averaging window "
                f"(the last {self.average_fraction} of the phase): its masks are frozen there"
            )
        if self.augment == "timm" and self.image_size is None:
            raise RecipeError("augment 'timm' needs `image_size` (e.g. 224) in the recipe")
        if self.average_fraction and self.ticket_selection != "last":
            raise RecipeError(
                "recipe key 'average_fraction' averages the last iterates: it needs ticket_selection: last"
            )
        if self.average_cycles < 0:
            raise RecipeError(f"recipe key 'average_cycles' must be >= 0, got {self.average_cycles}")
        if self.average_cycles and not self.average_fraction:
            raise RecipeError(
                "recipe key 'average_cycles' cycles the LR over the averaging window: set average_fraction"
            )
        if self.average_cycle_lr is not None and not self.average_cycle_lr > 0:
            raise RecipeError(f"recipe key 'average_cycle_lr' must be positive, got {self.average_cycle_lr}")
        if self.average_cycle_lr is not None and not self.average_cycles:
            raise RecipeError("recipe key 'average_cycle_lr' needs average_cycles")
        if not self.refine_lrs:
            raise RecipeError("recipe key 'refine_lrs' must list at least one learning rate")
        if len(set(self.exclude_classes)) != len(self.exclude_classes):
            raise RecipeError(f"recipe key 'exclude_classes' lists a class twice: {self.exclude_classes}")
        if self.refine_lr_milestones is not None:
            _check_milestones("refine_lr_milestones", self.refine_lr_milestones, self.refine_epochs, "refine_epochs")
            if len(self.refine_lr_milestones) != len(self.refine_lrs) - 1:
                raise RecipeError(
                    f"recipe key 'refine_lr_milestones' needs one milestone per LR after the first "
                    f"({len(self.refine_lrs) - 1} for refine_lrs {self.refine_lrs}), got {self.refine_lr_milestones}"
                )

    @property
    def is_sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    def sparsity_config(self) -> SparsityConfig:
        return SparsityConfig(**{f.name: getattr(self, f.name) for f in fields(SparsityConfig)})


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
