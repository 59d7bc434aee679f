"""Where images come from: a recipe's dataset name resolved, a ``datasets`` split loaded, built-in sets.

Built-in sources (no download): ``sklearn:digits``, scikit-learn's 1,797 8×8 handwritten digits
(values 0..16 scaled to 0..255), a handy out-of-distribution set for small grayscale models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from freetickets_hub.errors import DatasetError, MissingDependencyError, RecipeError

__all__ = ["BUILTIN_SOURCES", "DATASETS_ENV", "load_split", "public_dataset", "resolve_dataset"]

DATASETS_ENV = "FREETICKETS_DATASETS"  # the folder shipped recipes read their datasets from


def resolve_dataset(name: str) -> str:
    """A recipe's ``dataset`` as ``datasets.load_dataset`` takes it: ``${FREETICKETS_DATASETS}`` and ``~`` expanded.

    Shipped recipes name their data ``${FREETICKETS_DATASETS}/fashion_mnist``, so they work from any
    working folder: the variable names the folder holding the datasets; unset, it defaults to
    ``shared/datasets`` beside a source checkout (the development layout). A Hub id or a plain path
    is returned as given (``~`` expanded).

    Raises:
        RecipeError: the name uses the variable, it is unset and there is no checkout default.
    """
    if DATASETS_ENV in name:
        root = os.environ.get(DATASETS_ENV) or _checkout_datasets()
        if root is None:
            raise RecipeError(
                f"dataset {name!r} needs {DATASETS_ENV}: set it to the folder that holds the datasets "
                f"(export {DATASETS_ENV}=/path/to/datasets), or pass --set dataset=<Hub id or folder>"
            )
        name = name.replace("${" + DATASETS_ENV + "}", root).replace("$" + DATASETS_ENV, root)
    return os.path.expanduser(name)


def public_dataset(dataset: str) -> str:
    """``dataset`` as published files record it: a local folder by its last part only (no machine path).

    ``/home/me/data/fashion_mnist`` and ``${FREETICKETS_DATASETS}/fashion_mnist`` -> ``fashion_mnist``;
    a Hub id (``org/name``) stays as it is.
    """
    if DATASETS_ENV in dataset or os.path.exists(os.path.expanduser(dataset)):
        return Path(dataset.rstrip("/\\")).name
    return dataset


def _checkout_datasets() -> str | None:
    """``<checkout>/../shared/datasets`` when this module runs from a source checkout (not from a wheel)."""
    folder = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
    return str(folder) if folder.is_dir() else None


def load_split(source: str, split: str, dataset_config: str | None = None) -> Any:
    """One split of a ``datasets`` source (Hub id or folder) as a map-style ``datasets.Dataset``.

    Raises:
        DatasetError: unknown source or split, an empty split or slice, or an iterable dataset.
        MissingDependencyError: ``datasets`` is not installed.
    """
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError(
            "reading a dataset needs `datasets`: pip install 'freetickets-hub[train]'"
        ) from err
    try:
        ds = datasets.load_dataset(source, dataset_config, split=split)
    except (FileNotFoundError, ValueError) as err:  # unknown source / "Unknown split ..." / bad slice
        if "corresponds to no data" in str(err):  # how datasets reports an empty split or slice
            raise DatasetError(f"dataset {source!r} split {split!r} is empty") from err
        raise DatasetError(f"cannot load split {split!r} of dataset {source!r}: {err}") from err
    if not isinstance(ds, datasets.Dataset):
        raise DatasetError(f"dataset {source!r} split {split!r} is not a plain (map-style) dataset")
    return ds


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingDependencyError("the built-in dataset 'sklearn:digits' needs scikit-learn") from err
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]


BUILTIN_SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {"sklearn:digits": _load_digits}
