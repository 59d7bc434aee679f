"""The fine-tuning benchmark's datasets, written once as parquet folders that ``datasets.load_dataset`` reads.

- :func:`write_class_subset`: some Fashion-MNIST classes, relabelled ``0..n-1`` (the 0–4 → 5–9 transfer);
- :func:`write_digits`: scikit-learn's 1,797 digits, a seeded stratified 75/25 train/test split;
- :func:`write_corrupted`: Fashion-MNIST under one corruption of ``evaluation.corruptions`` (a domain shift
  in the base's own label space).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from freetickets_hub.evaluation.corruptions import CorruptionTransform

__all__ = ["write_class_subset", "write_corrupted", "write_digits"]

SPLIT_SEED = 0  # the digits train/test split and the corruption draws


def _write(dest: Path, split: str, images: Sequence[np.ndarray], labels: Sequence[int], names: list[str]) -> None:
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    ds = Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(dest / "data" / f"{split}-00000-of-00001.parquet"))


def _done(dest: Path) -> bool:
    return (dest / "data").is_dir()


def write_class_subset(source: str, classes: list[int], dest: Path, counts: dict[str, int | None]) -> Path:
    """The first ``counts[split]`` images of ``classes`` in each split (relabelled 0..n-1, names kept)."""
    from datasets import ClassLabel, load_dataset

    if _done(dest):
        return dest
    splits = load_dataset(source)
    for split, count in counts.items():
        ds = splits[split]
        names = ds.features["label"].names
        ds = ds.filter(lambda y: y in classes, input_columns="label")
        ds = ds.select(range(min(count, len(ds)))) if count is not None else ds
        ds = ds.map(lambda y: {"label": classes.index(y)}, input_columns="label")
        ds = ds.cast_column("label", ClassLabel(names=[names[c] for c in classes]))
        (dest / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(dest / "data" / f"{split}-00000-of-00001.parquet"))
    return dest


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 ``(1797, 8, 8)`` images (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def write_digits(dest: Path) -> Path:
    """scikit-learn's digits: a seeded, stratified 75/25 train/test split (1,347 / 450)."""
    from sklearn.model_selection import train_test_split

    if _done(dest):
        return dest
    images, labels = digits_arrays()
    rows = np.arange(len(images))
    train, test = train_test_split(rows, test_size=0.25, random_state=SPLIT_SEED, stratify=labels)
    for split, index in (("train", train), ("test", test)):
        _write(dest, split, images[index], labels[index].tolist(), [str(d) for d in range(10)])
    return dest


def write_corrupted(source: str, corruption: str, severity: int, dest: Path, counts: dict[str, int]) -> Path:
    """The first ``counts[split]`` images of each split under ``corruption`` at ``severity`` (seeded per image)."""
    import torch
    from datasets import load_dataset

    if _done(dest):
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
    return dest
