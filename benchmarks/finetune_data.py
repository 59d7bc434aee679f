"""The fine-tuning benchmark's datasets, written once as parquet folders that ``datasets.load_dataset`` reads.

Each split is written to a temporary name and renamed; ``written.json``, written last, records what the folder
holds, so an interrupted write is redone and a folder of other settings is refused.

- :func:`write_class_subset`: some Fashion-MNIST classes, relabelled ``0..n-1`` (the 0–4 → 5–9 transfer);
- :func:`write_digits`: scikit-learn's 1,797 digits, a seeded stratified 75/25 train/test split;
- :func:`write_corrupted`: Fashion-MNIST under one corruption of ``evaluation.corruptions`` (a domain shift
  in the base's own label space).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.data.sources import BUILTIN_SOURCES
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.evaluation.corruptions import CorruptionTransform

__all__ = ["write_class_subset", "write_corrupted", "write_digits"]

SPLIT_SEED = 0  # the digits train/test split and the corruption draws
WRITTEN = "written.json"  # what the folder holds, written last: a folder without it is rewritten


def _done(dest: Path, settings: dict[str, Any]) -> bool:
    """Whether ``dest`` already holds the dataset ``settings`` describe (another one is an error)."""
    marker = dest / WRITTEN
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text(encoding="utf-8"))
    if found != settings:
        raise FreeTicketsError(f"{dest} holds another dataset ({found}, not {settings}); choose another --output-dir")
    return True


def _save(ds: Any, dest: Path, split: str) -> None:
    """One split as ``dest/data/<split>-00000-of-00001.parquet``, written to a temporary name and renamed."""
    path = dest / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    ds.to_parquet(str(partial))
    os.replace(partial, path)


def _finish(dest: Path, settings: dict[str, Any]) -> Path:
    write_text_atomic(dest / WRITTEN, json.dumps(settings, sort_keys=True) + "\n")
    return dest


def _write(dest: Path, split: str, images: Sequence[np.ndarray], labels: Sequence[int], names: list[str]) -> None:
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    _save(Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features), dest, split)


def write_class_subset(source: str, classes: list[int], dest: Path, counts: dict[str, int | None]) -> Path:
    """The first ``counts[split]`` images of ``classes`` in each split (relabelled 0..n-1, names kept)."""
    from datasets import ClassLabel, load_dataset

    settings = {"source": Path(source).name, "classes": classes, "counts": counts}
    if _done(dest, settings):
        return dest
    splits = load_dataset(source)
    for split, count in counts.items():
        ds = splits[split]
        names = ds.features["label"].names
        ds = ds.filter(lambda y: y in classes, input_columns="label")
        ds = ds.select(range(min(count, len(ds)))) if count is not None else ds
        ds = ds.map(lambda y: {"label": classes.index(y)}, input_columns="label")
        _save(ds.cast_column("label", ClassLabel(names=[names[c] for c in classes])), dest, split)
    return _finish(dest, settings)


def write_digits(dest: Path) -> Path:
    """scikit-learn's digits: a seeded, stratified 75/25 train/test split (1,347 / 450)."""
    from sklearn.model_selection import train_test_split

    settings = {"source": "sklearn:digits", "test_size": 0.25, "seed": SPLIT_SEED}
    if _done(dest, settings):
        return dest
    images, labels, names = BUILTIN_SOURCES["sklearn:digits"]()
    rows = np.arange(len(images))
    train, test = train_test_split(rows, test_size=0.25, random_state=SPLIT_SEED, stratify=labels)
    for split, index in (("train", train), ("test", test)):
        _write(dest, split, images[index], labels[index].tolist(), names)
    return _finish(dest, settings)


def write_corrupted(source: str, corruption: str, severity: int, dest: Path, counts: dict[str, int]) -> Path:
    """The first ``counts[split]`` images of each split under ``corruption`` at ``severity`` (seeded per image)."""
    import torch
    from datasets import load_dataset

    settings = {"source": Path(source).name, "corruption": corruption, "severity": severity, "counts": counts}
    if _done(dest, settings):
        return dest
    splits = load_dataset(source)
    transform = CorruptionTransform(corruption, severity, seed=SPLIT_SEED)
    for split, count in counts.items():
        ds = splits[split].select(range(count))
        images = [
            transform(torch.from_numpy(np.asarray(row["image"].convert("L"), dtype=np.uint8))[None], index)[0].numpy()
            for index, row in enumerate(ds)
        ]
        _write(dest, split, images, ds["label"], ds.features["label"].names)
    return _finish(dest, settings)
