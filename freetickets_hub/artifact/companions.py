"""What travels with a saved ensemble besides its weights: the companions and the Endpoints handler.

Companions (``onnx/``, ``assets/``, ``train_summary.json``, ``eval_results.json``) describe one set of
weights, so they are copied from a source folder only while they still describe the weights being
saved. ``handler.py`` + ``requirements.txt`` let Inference Endpoints serve the folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from freetickets_hub import __version__
from freetickets_hub.artifact.files import atomic_path, visible_files, write_text_atomic
from freetickets_hub.artifact.names import (
    ASSETS_DIR,
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    HANDLER_NAME,
    ONNX_DIR,
    PICKLE_SUFFIXES,
    REQUIREMENTS_NAME,
    SUMMARY_NAME,
    WEIGHTS_NAME,
)

__all__ = ["companion_files", "companion_source", "copy_companions", "write_endpoint_files"]

logger = logging.getLogger(__name__)

_HANDLER_SOURCE = ("freetickets_hub.model", "endpoint_handler.py")  # the module handler.py is a copy of


def companion_files(folder: Path) -> list[str]:
    """Relative paths of the folder's companions that travel with the artifact (never pickles)."""
    if not folder.is_dir():
        return []
    names = [name for name in (SUMMARY_NAME, EVAL_RESULTS_NAME) if (folder / name).is_file()]
    for sub in (ONNX_DIR, ASSETS_DIR):
        names += [
            p.relative_to(folder).as_posix()
            for p in visible_files(folder / sub)
            if not p.name.endswith(PICKLE_SUFFIXES)
        ]
    return names


def companion_source(
    save_directory: Path,
    *,
    extras_from: str | Path | None,
    source_dir: Path | None,
    tensors: Mapping[str, torch.Tensor],
    config: dict[str, Any],
) -> Path | None:
    """The folder to copy companions from, or None; warns when companions no longer match the weights.

    Args:
        save_directory: where the artifact is being written.
        extras_from: a folder the caller names: its companions are copied whatever changed.
        source_dir: the folder the ensemble was loaded from: its companions are copied only while
            that folder holds exactly ``config`` and ``tensors``.
        tensors: the encoded weights being saved.
        config: the config being saved, as a JSON object.
    """
    source = Path(extras_from) if extras_from is not None else source_dir
    if source is not None and source.resolve() == save_directory.resolve():
        target_companions = companion_files(save_directory)
        if target_companions and extras_from is None and not _holds_artifact(save_directory, tensors, config):
            logger.warning("%s in %s describe the weights being replaced there", target_companions, save_directory)
        return None  # they are in place already
    stale = extras_from is None and source is not None and companion_files(source)
    if stale and not _holds_artifact(source, tensors, config):
        logger.warning(
            "Not copying %s from %s: the ensemble changed since it was loaded, so they would describe "
            "other weights. Re-export / re-evaluate, or pass extras_from= to copy them anyway.",
            stale,
            source,
        )
        return None
    return source


def copy_companions(source: Path, save_directory: Path) -> None:
    """Copy every companion of ``source`` into ``save_directory``, each file atomically."""
    for name in companion_files(source):
        with atomic_path(save_directory / name) as tmp:
            shutil.copyfile(source / name, tmp)


def write_endpoint_files(save_directory: Path) -> None:
    """``handler.py`` (Inference Endpoints' entry point) and the ``requirements.txt`` it needs."""
    package, name = _HANDLER_SOURCE
    handler = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    write_text_atomic(save_directory / HANDLER_NAME, handler)
    write_text_atomic(save_directory / REQUIREMENTS_NAME, f"freetickets-hub[torch]>={__version__}\n")


def _holds_artifact(folder: Path, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> bool:
    """Whether ``folder`` already holds exactly this config and these tensors (content, not bytes)."""
    try:
        if json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")) != config:
            return False
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            if set(f.keys()) != set(tensors):
                return False
            return all(_identical(f.get_tensor(key), tensor) for key, tensor in tensors.items())
    except (OSError, ValueError, SafetensorError):
        return False


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b.cpu())
