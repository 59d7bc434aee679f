"""Shared fixtures: a tiny image-classification dataset in the Hub's parquet layout, and tiny ensembles."""

from __future__ import annotations

import os
from pathlib import Path

# No network in tests: every Hub and datasets lookup must resolve locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image

SHARED_FMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion_mnist"
LABELS = ["circle", "square", "cross"]


def _images(count: int, size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """Three easy classes drawn with noise, so a few training steps already learn something."""
    images, labels = [], []
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    shapes = [
        (yy - centre) ** 2 + (xx - centre) ** 2 < (size / 3) ** 2,
        (abs(yy - centre) < size / 3) & (abs(xx - centre) < size / 3),
        (abs(yy - xx) < 2) | (abs(yy + xx - size + 1) < 2),
    ]
    for i in range(count):
        label = i % len(shapes)
        noise = rng.integers(0, 60, (size, size))
        images.append((shapes[label] * 180 + noise).clip(0, 255).astype(np.uint8))
        labels.append(label)
    return images, labels


def write_image_dataset(
    root: Path, *, train: int = 96, test: int = 48, size: int = 12, seed: int = 0, rgb_mixed_sizes: bool = False
) -> Path:
    """Write ``root/data/{train,test}-00000-of-00001.parquet`` that ``datasets.load_dataset(root)`` reads.

    ``rgb_mixed_sizes`` makes RGB images whose sizes differ (ImageNet-style data).
    """
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=LABELS)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = _images(count, size, rng)
        if rgb_mixed_sizes:
            images = [np.stack([im, im[::-1], im.T], -1).repeat(1 + i % 2, axis=0) for i, im in enumerate(images)]
        ds = Dataset.from_dict({"image": images, "label": labels}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_dataset(tmp_path_factory.mktemp("tiny_dataset"))
