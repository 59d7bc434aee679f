"""Image-classification data from any ``datasets`` source, held as uint8 tensors for fast CPU training.

Images are decoded once into a ``(N, C, H, W)`` uint8 tensor; augmentation and normalisation run on
whole batches, on the training device, which is far cheaper than per-image PIL transforms on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Image, load_dataset

from freetickets_hub.errors import RecipeError

from .recipe import Recipe

__all__ = ["ImageData", "ImageSplit", "augment_batch", "load_image_data", "normalize"]


@dataclass
class ImageSplit:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> ImageSplit:
        return self if count is None else ImageSplit(self.images[:count], self.labels[:count])


@dataclass
class ImageData:
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit
    label_names: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, measured on the training images
    std: tuple[float, ...]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def load_image_data(recipe: Recipe) -> ImageData:
    """Load the recipe's dataset, carve a seeded validation split from train, apply the sample caps."""
    try:
        splits = load_dataset(recipe.dataset, recipe.dataset_config)
    except (FileNotFoundError, ValueError, ConnectionError) as err:  # includes datasets' DatasetNotFoundError
        raise RecipeError(f"cannot load dataset {recipe.dataset!r}: {err}") from err
    for name in (recipe.train_split, recipe.test_split):
        if name not in splits:
            raise RecipeError(f"dataset {recipe.dataset!r} has no split {name!r}; it has {sorted(splits)}")
    train_ds, test_ds = splits[recipe.train_split], splits[recipe.test_split]
    image_col, label_col = _columns(train_ds, recipe)
    label_names = train_ds.features[label_col].names
    if test_ds.features[label_col] != train_ds.features[label_col]:
        raise RecipeError(f"splits {recipe.train_split!r} and {recipe.test_split!r} have different label sets")
    mode = _image_mode(train_ds, image_col)
    train = _to_tensors(train_ds, image_col, label_col, mode)
    test = _to_tensors(test_ds, image_col, label_col, mode).head(recipe.max_test_samples)
    if len(train) == 0 or len(test) == 0:
        raise RecipeError(f"dataset {recipe.dataset!r}: the train or test split is empty")
    val = None
    if recipe.val_size:
        if recipe.val_size >= len(train):
            raise RecipeError(f"val_size {recipe.val_size} leaves no training images (train has {len(train)})")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))
        val_idx, train_idx = order[: recipe.val_size], order[recipe.val_size :]
        val = ImageSplit(train.images[val_idx], train.labels[val_idx])
        train = ImageSplit(train.images[train_idx], train.labels[train_idx])
    train = train.head(recipe.max_train_samples)
    pixels = train.images.float().div_(255)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData(train, val, test, list(label_names), mean, std)


def _columns(ds: Dataset, recipe: Recipe) -> tuple[str, str]:
    features = ds.features
    image_col = recipe.image_column or next((k for k, v in features.items() if isinstance(v, Image)), None)
    label_col = recipe.label_column or next((k for k, v in features.items() if isinstance(v, ClassLabel)), None)
    if image_col not in features or not isinstance(features[image_col], Image):
        raise RecipeError(f"no image column found (columns: {list(features)}); set `image_column` in the recipe")
    if label_col not in features or not isinstance(features[label_col], ClassLabel):
        raise RecipeError(f"no ClassLabel column found (columns: {list(features)}); set `label_column` in the recipe")
    return image_col, label_col


def _image_mode(ds: Dataset, image_col: str) -> str:
    """Grayscale data stays one channel; anything else becomes RGB."""
    return "L" if ds[0][image_col].mode in ("L", "1", "I;16") else "RGB"


def _to_tensors(ds: Dataset, image_col: str, label_col: str, mode: str) -> ImageSplit:
    ds = ds.cast_column(image_col, Image(mode=mode)).with_format("numpy")
    batch = ds[:]
    images = batch[image_col]
    if images.dtype == object:
        raise RecipeError(f"images in column {image_col!r} have different sizes; resize them to one size first")
    images = torch.from_numpy(np.ascontiguousarray(images))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.from_numpy(batch[label_col]).long())


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float, scaled to [0, 1] and standardised per channel."""
    return (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment_batch(images: torch.Tensor, mode: str, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and (``pad_crop_flip``) a horizontal flip of half the images."""
    if mode == "none":
        return images
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])
    if mode == "pad_crop_flip":
        flip = torch.rand(batch, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out
