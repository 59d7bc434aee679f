"""All Hugging Face Hub I/O: file names, downloads tagged with our library, and single-commit uploads.

Every other module works on local paths; a repo id becomes a local file here, and a local folder
becomes one commit here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from freetickets_hub import __version__
from freetickets_hub.artifact.files import visible_files
from freetickets_hub.artifact.names import LIBRARY_NAME, PICKLE_SUFFIXES
from freetickets_hub.errors import ModelNotFoundError

__all__ = [
    "is_repo_id",
    "push_folder",
    "push_staged",
    "resolve_file",
]


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

    ``HF_HUB_OFFLINE=1`` makes Hub repo ids resolve from the cache only (huggingface_hub honours it).

    Raises:
        FileNotFoundError: the folder exists but lacks ``filename``.
        ModelNotFoundError: ``repo_id_or_dir`` reads as a local path that does not exist (at once, no
            Hub request), or the repo is not in the cache while offline, or not on the Hub.
        huggingface_hub errors: other failures of ``hf_hub_download`` (network, gated...).
    """
    if os.path.isdir(repo_id_or_dir):
        path = Path(repo_id_or_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{filename} not found in {Path(repo_id_or_dir).resolve()}")
        return path
    name = str(repo_id_or_dir)
    reason = _path_like(name)
    if reason:
        raise ModelNotFoundError(f"no such model folder: {name!r} ({reason})")
    try:
        return Path(
            hf_hub_download(
                repo_id=name,
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
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE or local_files_only) and not cached
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        raise ModelNotFoundError(
            f"{name!r} is not a local folder, and {filename} of Hub repo {name!r}"
            f"{f' (revision {revision})' if revision else ''} is not in the Hub cache {cache}; {why} allows no "
            "download (unset it to download, or check the spelling)"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"{name!r} is neither a local folder nor a Hub repo you can access (check the spelling, or log in "
            "with `hf auth login` for a private repo)"
        ) from err
    except RemoteEntryNotFoundError as err:
        raise ModelNotFoundError(f"Hub repo {name!r} has no {filename}: is it a FreeTickets ensemble?") from err


def _path_like(name: str) -> str | None:
    """Why ``name`` (which is no existing folder) must be a mistyped local path rather than a Hub repo id."""
    if os.path.exists(name):
        return "it is a file, not a folder"
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1:
        return "it does not exist"
    if "/" not in name:
        return "it does not exist, and a Hub repo id has the form org/name"
    if os.path.isdir(name.split("/")[0]):
        return f"it does not exist, though {name.split('/')[0]!r} does"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "it does not exist, and it is no valid Hub repo id"
    return None


def is_repo_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id (``name`` or ``org/name``) rather than a local path."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload FreeTickets ensemble",
    create_pr: bool = False,
    token: str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it as ONE commit.

    ``create_commit`` with explicit operations is used instead of ``upload_folder``: with ``hf_xet``
    installed, ``upload_folder`` may split a large folder over several commits.

    Args:
        folder: a staged artifact folder (see ``EnsembleModel.push_to_hub``).
        repo_id: ``org/name`` on the Hub.
        private: visibility of a newly created repo (None: the namespace's default).
        revision: branch to commit to (created from ``main`` when missing); default ``main``.
        commit_message: the commit's summary.
        create_pr: open a pull request with the commit instead of committing to the branch.
        token: Hub token; default: the locally saved one.

    Raises:
        ValueError: ``folder`` holds a pickle-format file (never published).
    """
    folder = Path(folder)
    files = visible_files(folder)
    pickles = [p.relative_to(folder).as_posix() for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"refusing to upload pickle-format files {pickles} from {folder}")
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    if revision not in (None, "main") and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in files
    ]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )


def push_staged(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload FreeTickets ensemble",
    create_pr: bool = False,
    token: str | None = None,
) -> CommitInfo:
    """Stage an artifact with ``write(folder)`` in a temporary folder; push it as ONE commit (:func:`push_folder`)."""
    with tempfile.TemporaryDirectory(prefix="freetickets-push-") as tmp:
        write(Path(tmp))
        return push_folder(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            token=token,
        )
