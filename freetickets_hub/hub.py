"""All Hugging Face Hub I/O: file names, and downloads tagged with our library name and version.

Every other module works on local paths; a repo id becomes a local file here.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download

from . import __version__

__all__ = ["CONFIG_NAME", "LIBRARY_NAME", "ONNX_NAME", "WEIGHTS_NAME", "resolve_file"]

LIBRARY_NAME = "freetickets-hub"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "onnx/model.onnx"


def resolve_file(
    repo_id_or_dir: str | os.PathLike[str],
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local path of ``filename`` from a local folder or a Hub repo (downloaded into the HF cache).

    Raises:
        FileNotFoundError: the folder exists but lacks ``filename``.
        huggingface_hub errors: as raised by ``hf_hub_download`` (offline, not found, gated...).
    """
    if os.path.isdir(repo_id_or_dir):
        path = Path(repo_id_or_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{filename} not found in {Path(repo_id_or_dir).resolve()}")
        return path
    return Path(
        hf_hub_download(
            repo_id=str(repo_id_or_dir),
            filename=filename,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    )
