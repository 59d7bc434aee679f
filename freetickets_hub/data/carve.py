"""The validation carve: the seeded rows a training run holds out of its train split.

Training carves with :func:`validation_carve`; ``calibrate``, the demo and the benchmarks find the
same rows again from the run's recorded recipe with :func:`run_validation_rows`, so a temperature or
an abstention rule is fitted on exactly the images the run never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from .sources import load_split, resolve_dataset

__all__ = ["Carve", "run_validation_rows", "validation_carve"]


class Carve(NamedTuple):
    """Row indices of one seeded split of ``num_rows`` rows."""

    train: torch.Tensor  # (num_rows - size,) int64: the rows left for training
    val: torch.Tensor  # (size,) int64: the rows held out for validation


def validation_carve(num_rows: int, size: int, seed: int) -> Carve:
    """A seeded validation carve of ``size`` of ``num_rows`` rows, and the rows left for training."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return Carve(train=order[size:], val=order[:size])


def run_validation_rows(recipe: Mapping[str, Any], source: str | None = None) -> list[int]:
    """Rows of a run's train split that its validation carve held out, as the trainer carved them.

    Args:
        recipe: the run's recipe as ``train_summary.json`` records it (``dataset``, ``train_split``,
            ``val_size``, ``seed``; ``exclude_classes`` drops those classes' rows before the carve).
        source: the dataset to read (default: the recipe's own ``dataset``).
    """
    ds = load_split(source or resolve_dataset(recipe["dataset"]), recipe["train_split"], recipe.get("dataset_config"))
    rows = np.arange(len(ds))
    excluded = recipe.get("exclude_classes") or []
    if excluded:  # the trainer carves the rows left after the excluded classes are dropped
        import datasets

        label_col = recipe.get("label_column") or next(
            k for k, v in ds.features.items() if isinstance(v, datasets.ClassLabel)
        )
        names = ds.features[label_col].names
        labels = np.asarray(ds.with_format("numpy")[label_col][:])
        rows = np.flatnonzero(~np.isin(labels, [names.index(name) for name in excluded]))
    return rows[validation_carve(len(rows), recipe["val_size"], recipe["seed"]).val.numpy()].tolist()
