"""Combine ensembles from separate runs into one, and export one member as a plain timm folder.

DST Ensemble members are independent runs (DESIGN.md), so they may be trained on separate machines
and merged afterwards. Members are only combined when they are interchangeable: same architecture,
classes, labels, model arguments, input preprocessing and sparsity.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from freetickets_hub.artifact.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.artifact.files import atomic_path, write_text_atomic
from freetickets_hub.artifact.hub import CONFIG_NAME, README_NAME, WEIGHTS_NAME
from freetickets_hub.errors import ConfigError

if TYPE_CHECKING:
    from freetickets_hub.model.ensemble import EnsembleModel

__all__ = ["INPUT_KEYS", "architecture_import", "export_member", "merge_ensembles"]

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
    from freetickets_hub.model.ensemble import EnsembleModel

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


def export_member(model: EnsembleModel, index: int, save_directory: str | Path) -> Path:
    """Write member ``index`` as a plain timm folder: timm's ``config.json``, dense ``model.safetensors``
    and a ``README.md`` card whose snippet loads it.

    ``timm.create_model("local-dir:<folder>", pretrained=True)`` (or ``"hf-hub:<repo>"`` once
    uploaded) rebuilds it with identical outputs. timm finds an architecture only once the module
    that registers it is imported: for this project's CIFAR-style WRNs (``cifar_wrn*``) that is
    ``import freetickets_hub.model.architectures`` (``pip install "freetickets-hub[torch]"``), which the card
    says; timm's own architectures need nothing. The member gives raw logits: the ensemble's
    temperature is not applied.

    Raises:
        IndexError: ``index`` is not a member of ``model``.
    """
    if not 0 <= index < model.num_members:
        raise IndexError(f"member {index} does not exist: the ensemble has {model.num_members} member(s)")
    save_directory = Path(save_directory)
    member = model.members[index]
    cfg = model.config
    # timm's own pretrained_cfg fields (first_conv, classifier...) updated with this ensemble's preprocessing
    pretrained_cfg = {
        k: _plain(v)
        for k, v in member.pretrained_cfg.items()
        if k not in ("architecture", "file", "source", "state_dict", "hf_hub_id", "url") and v is not None
    }
    if list(cfg.pretrained_cfg.get("input_size", [])[1:]) != list(pretrained_cfg.get("input_size", [])[1:]):
        pretrained_cfg.pop("pool_size", None)  # timm's default was for its default input size
    pretrained_cfg.update(copy.deepcopy(cfg.pretrained_cfg))
    pretrained_cfg["num_classes"] = cfg.num_classes
    timm_config = {
        "architecture": cfg.architecture,
        "num_classes": cfg.num_classes,
        "num_features": int(member.num_features),
        "model_args": copy.deepcopy(cfg.model_args),
        "pretrained_cfg": pretrained_cfg,
    }
    if cfg.label_names:
        timm_config["label_names"] = list(cfg.label_names)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in member.state_dict().items()}
    with atomic_path(save_directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(save_directory / CONFIG_NAME, json.dumps(timm_config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(save_directory / README_NAME, _member_card(model, index, save_directory.name))
    return save_directory


def architecture_import(architecture: str) -> str | None:
    """The import that registers ``architecture`` with timm, when timm itself does not define it."""
    import timm

    module = timm.models.model_entrypoint(architecture).__module__
    return None if module.startswith("timm.") else module


def _member_card(model: EnsembleModel, index: int, folder: str) -> str:
    """A timm-style card for one exported member, with the exact lines that load it in a fresh process."""
    cfg = model.config
    module = architecture_import(cfg.architecture)
    install = 'pip install timm "freetickets-hub[torch]"' if module else "pip install timm"
    imports = (
        f"import {module}  # registers {cfg.architecture} with timm (timm alone does not know it)\n" if module else ""
    )
    note = (
        f"`{cfg.architecture}` is defined by `{module}`, not by timm: import it before `timm.create_model`, "
        f"or timm fails with `Unknown model ({cfg.architecture})`."
        if module
        else f"`{cfg.architecture}` is a timm architecture: timm alone loads this folder."
    )
    return (
        "---\nlibrary_name: timm\npipeline_tag: image-classification\ntags: [image-classification, timm, freetickets]\n"
        f"---\n\n# Member {index} of a {cfg.ensemble.method.upper()} ensemble of `{cfg.architecture}`\n\n"
        f"One dense member exported from a FreeTickets sparse ensemble ({cfg.ensemble.num_members} members, "
        f"sparsity {cfg.ensemble.sparsity}). It gives raw logits: the ensemble's calibration temperature "
        f"({cfg.ensemble.temperature:.4f}) is not applied.\n\n{note}\n\n"
        f"```bash\n{install}\n```\n\n"
        f"```python\n{imports}import timm\n\n"
        f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()  # or "hf-hub:<org>/<name>"\n'
        "config = timm.data.resolve_data_config(model=model)\n"
        "transform = timm.data.create_transform(**config)\n```\n"
    )
