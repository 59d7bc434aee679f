"""Atomic file writes (a reader sees the old file or the complete new one, never half of one), visible files,
and the guard every command that writes a model folder runs before its work starts."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from freetickets_hub.artifact.names import (
    ASSETS_DIR,
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    HANDLER_NAME,
    ONNX_DIR,
    README_NAME,
    REQUIREMENTS_NAME,
    SUMMARY_NAME,
    WEIGHTS_NAME,
)
from freetickets_hub.errors import OutputDirError

__all__ = ["MODEL_ENTRIES", "atomic_path", "check_writable", "prepare_output_dir", "visible_files", "write_text_atomic"]

logger = logging.getLogger(__name__)

# what a saved model (and the run that trained it) leaves in its folder: each entry describes those
# weights only, so a folder either keeps all of them or loses all of them
MODEL_ENTRIES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    README_NAME,
    HANDLER_NAME,
    REQUIREMENTS_NAME,
    SUMMARY_NAME,
    EVAL_RESULTS_NAME,
    ONNX_DIR,
    ASSETS_DIR,
    "plots",
    "checkpoints",
    "freetickets",  # the accelerate tracker's logs (`train --report-to`)
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and writers that recreate the file) leave 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def visible_files(folder: Path) -> list[Path]:
    """Files below ``folder``, sorted, without hidden paths (a part starting with ".": an atomic write or
    export in progress, ``.git``, caches), which never travel with an artifact."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    )


def check_writable(path: str | Path) -> Path:
    """Fail now, not after the work, if files cannot be created in folder ``path`` (created later if missing).

    Raises:
        OutputDirError: ``path`` is a file, or neither it nor the folder it would be created in is writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"cannot write into {str(path)!r}: it is a file, not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputDirError(f"cannot create folder {str(path)!r}: {str(existing)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".freetickets-write-check-"):
            pass
    except OSError as err:
        raise OutputDirError(
            f"cannot write to {str(path)!r}: {str(existing)!r} is not writable ({err.strerror})"
        ) from err
    return path


def prepare_output_dir(
    path: str | Path, *, overwrite: bool = False, resume: bool = False, can_resume: bool = False
) -> Path:
    """Make ``path`` safe to write one model into, before any work starts: a folder never holds files of two models.

    A folder that holds a model's files (any of :data:`MODEL_ENTRIES`) is refused, untouched, unless
    ``resume`` (the caller continues that very run) or ``overwrite`` (those entries are removed now,
    so nothing that described the old weights survives beside the new ones). Other files are kept.
    ``can_resume`` only adds ``--resume`` to the error's advice (commands that can continue a run).

    Raises:
        OutputDirError: the folder holds a model and neither flag is set, or it is not writable.
    """
    path = check_writable(path)
    present = [name for name in MODEL_ENTRIES if (path / name).exists()]
    if not present or resume:
        return path
    if not overwrite:
        raise OutputDirError(
            f"{str(path)!r} already holds a model ({', '.join(present)}); nothing was changed. "
            "Choose a new folder, or pass --overwrite to replace it"
            + (" (or --resume to continue its training)" if can_resume else "")
        )
    for name in present:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    logger.warning("--overwrite: removed %s from %s", ", ".join(present), path)
    return path
