"""Combine ensembles from separate runs into one.

DST Ensemble members are independent runs (DESIGN.md), so they may be trained on separate machines
and merged afterwards. Members are only combined when they are interchangeable: same architecture,
classes, labels, model arguments, input preprocessing and sparsity.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from freetickets_hub.artifact.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.errors import ConfigError
from freetickets_hub.model.ensemble import EnsembleModel

__all__ = ["INPUT_KEYS", "merge_ensembles"]

logger = logging.getLogger(__name__)

# pretrained_cfg keys that decide what a member sees: members that differ here are not interchangeable
INPUT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def merge_ensembles(models: Sequence[EnsembleModel], *, names: Sequence[str] | None = None) -> EnsembleModel:
    """One ensemble holding every member of ``models``, in order.

    The method becomes ``"dst"`` when every input is a DST ensemble, else ``"merged"``; the sparsity
    is kept; a fitted temperature is dropped (it was fitted for other members), with a warning.

    Args:
        models: ensembles to combine (at least two).
        names: how to call each input in error messages (default: ``input 0``, ``input 1``...).

    Raises:
        ConfigError: naming the first field in which an input differs from the first one.
    """
    if len(models) < 2:
        raise ConfigError(f"merging needs at least two ensembles, got {len(models)}")
    names = list(names) if names is not None else [f"input {i}" for i in range(len(models))]
    first = models[0].config
    reference = _identity(first)
    for name, model in zip(names[1:], models[1:], strict=True):
        for key, value in _identity(model.config).items():
            if value != reference[key]:
                raise ConfigError(
                    f"cannot merge {name} into {names[0]}: {key} differs ({value!r} vs {reference[key]!r})"
                )
    _refuse_duplicates(models, names)
    calibrated = [name for name, model in zip(names, models, strict=True) if model.config.ensemble.calibration]
    if calibrated:
        logger.warning(
            "Dropping the calibration temperature of %s: it was fitted for other members. "
            "The merged ensemble is uncalibrated; run `freetickets calibrate` on it.",
            ", ".join(calibrated),
        )
    methods = {model.config.ensemble.method for model in models}
    config = EnsembleConfig(
        architecture=first.architecture,
        num_classes=first.num_classes,
        model_args=copy.deepcopy(first.model_args),
        label_names=copy.deepcopy(first.label_names),
        pretrained_cfg=copy.deepcopy(first.pretrained_cfg),
        ensemble=EnsembleInfo(
            method="dst" if methods == {"dst"} else "merged",
            num_members=sum(model.num_members for model in models),
            sparsity=first.ensemble.sparsity,
            distribution=first.ensemble.distribution,
            member_widths=[
                model.config.ensemble.widths_of(i) for model in models for i in range(model.num_members)
            ],  # slim members keep their own channels (None for all full-width: a format-1 config)
        ),
    )
    merged = EnsembleModel(config)
    index = 0
    for model in models:
        for member, masks in zip(model.members, model.masks, strict=True):
            merged.load_member(index, member.state_dict(), masks)
            index += 1
    dtypes = {model.values_dtype for model in models}
    merged.values_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    return merged


def _refuse_duplicates(models: Sequence[EnsembleModel], names: Sequence[str]) -> None:
    """Identical members add nothing to an ensemble but weight: ``merge A A`` is a mistake.

    Raises:
        ConfigError: naming the two inputs and members that hold the same weights.
    """
    seen: dict[str, tuple[int, str]] = {}
    for position, (name, model) in enumerate(zip(names, models, strict=True)):
        for index, member in enumerate(model.members):
            digest = hashlib.sha256()
            for key, tensor in sorted(member.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            where = (position, f"member {index} of {name}")
            first = seen.setdefault(digest.hexdigest(), where)
            if first != where:
                raise ConfigError(
                    f"{where[1]} has exactly the weights of {first[1]}: is the same run named twice? "
                    "Merge each run once"
                )


def _identity(config: EnsembleConfig) -> dict[str, Any]:
    """What must be equal for members of two ensembles to be interchangeable."""
    return {
        "architecture": config.architecture,
        "num_classes": config.num_classes,
        "label_names": config.label_names,
        "model_args": config.model_args,
        **{f"pretrained_cfg.{k}": _plain(config.pretrained_cfg.get(k)) for k in INPUT_KEYS},
        "ensemble.sparsity": config.ensemble.sparsity,
        "ensemble.distribution": config.ensemble.distribution,
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
