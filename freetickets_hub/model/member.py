"""Export one member of an ensemble as a plain, dense timm folder that ``timm.create_model`` loads."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import CONFIG_NAME, README_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from freetickets_hub.model.ensemble import EnsembleModel

__all__ = ["architecture_import", "export_member"]


def export_member(model: EnsembleModel, index: int, save_directory: str | Path) -> Path:
    """Write member ``index`` as a plain timm folder (timm's ``save_for_hf``: ``config.json``, ``model.safetensors``)
    and a ``README.md`` card whose snippet loads it.

    ``timm.create_model("local-dir:<folder>", pretrained=True)`` (or ``"hf-hub:<repo>"`` once
    uploaded) rebuilds it with identical outputs. timm finds an architecture only once the module
    that registers it is imported: for this project's CIFAR-style WRNs (``cifar_wrn*``) that is
    ``import freetickets_hub.model.architectures`` (``pip install "freetickets-hub[torch]"``), which the card
    says; timm's own architectures need nothing. The member gives raw logits: the ensemble's
    temperature is not applied.

    Raises:
        IndexError: ``index`` is not a member of ``model``.
        ValueError: the member is slim (its channels differ from the architecture's, which timm's
            folder format cannot record).
    """
    if not 0 <= index < model.num_members:
        raise IndexError(f"member {index} does not exist: the ensemble has {model.num_members} member(s)")
    if model.config.ensemble.widths_of(index) is not None:
        raise ValueError(
            f"member {index} is slim (channel-level sparsity): timm's folder format records no per-layer widths, "
            "so timm.create_model could not rebuild it; keep it in the ensemble artifact"
        )
    from timm.models import save_for_hf

    save_directory = Path(save_directory)
    cfg = model.config
    model_config: dict[str, Any] = {"pretrained_cfg": copy.deepcopy(cfg.pretrained_cfg)}
    if cfg.label_names:
        model_config["label_names"] = list(cfg.label_names)
    save_directory.mkdir(parents=True, exist_ok=True)
    # timm writes the weights and config.json itself; into a sibling folder first, then each file is
    # moved over in one step, so a crash never leaves a half-written member
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".member-") as staging:
        save_for_hf(
            model.members[index],
            staging,
            model_config=model_config,
            model_args=copy.deepcopy(cfg.model_args),
            safe_serialization=True,
        )
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(Path(staging) / name, save_directory / name)
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
