"""A training recipe's data, in one of two forms, with the run's validation carve and its augmentation.

Small images (``augment: pad_crop_flip | crop | none``) are decoded once into a ``(N, C, H, W)`` uint8
tensor; augmentation and normalisation run on whole batches on the training device, far cheaper than
per-image PIL transforms on 2 cores. ImageNet-style data (``augment: timm``) stays a ``datasets``
table decoded per image through timm's ``create_transform`` in DataLoader workers. Decoding, the
dataset name and the carve come from :mod:`freetickets_hub.data`, which evaluation reads through too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import ClassLabel, Dataset, Image, load_dataset
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, TensorDataset

from freetickets_hub.data import channels_first, decode_images, resolve_dataset, validation_carve
from freetickets_hub.errors import RecipeError

from .recipe import Recipe

__all__ = [
    "ImageData",
    "ImageSplit",
    "Split",
    "StreamedSplit",
    "augment_batch",
    "load_image_data",
    "normalize",
]


@dataclass
class ImageSplit:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> ImageSplit:
        return self if count is None else ImageSplit(self.images[:count], self.labels[:count])


@dataclass
class StreamedSplit:
    """A ``datasets`` table decoded and transformed image by image (too large to hold in memory)."""

    table: Dataset
    image_col: str
    mode: str  # PIL mode the model wants: "L" or "RGB"
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> StreamedSplit:
        if count is None or count >= len(self):
            return self
        return StreamedSplit(self.table.select(range(count)), self.image_col, self.mode, self.labels[:count])

    def subset(self, indices: torch.Tensor) -> StreamedSplit:
        return StreamedSplit(self.table.select(indices.tolist()), self.image_col, self.mode, self.labels[indices])


class _Transformed(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs of a streamed split."""

    def __init__(self, split: StreamedSplit, transform: Callable) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.split.table[index][self.split.image_col].convert(self.split.mode)
        return self.transform(image), self.split.labels[index]


Split = ImageSplit | StreamedSplit


@dataclass
class ImageData:
    train: Split
    val: Split | None
    test: Split
    label_names: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) the model sees
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    crop_pct: float = 1.0  # evaluation resize/crop, stored in the model's pretrained_cfg
    interpolation: str = "bilinear"
    train_transform: Callable | None = None  # streamed data only: timm's training transform

    @property
    def streamed(self) -> bool:
        return self.train_transform is not None

    def training_set(self) -> torch.utils.data.Dataset:
        if isinstance(self.train, StreamedSplit):
            return _Transformed(self.train, self.train_transform)
        return TensorDataset(self.train.images, self.train.labels)

    def prepare_batch(self, images: torch.Tensor, augment: str, pad: int, generator: torch.Generator) -> torch.Tensor:
        """A training batch as the model's float input (streamed batches arrive ready)."""
        if self.streamed:
            return images
        return self._normalize(augment_batch(images, augment, pad, generator))

    def eval_batches(self, split: Split, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Evaluation inputs of a whole split, in order, on ``device``."""
        if isinstance(split, ImageSplit):
            for start in range(0, len(split), batch_size):
                yield self._normalize(split.images[start : start + batch_size].to(device))
            return
        loader = DataLoader(_Transformed(split, self.eval_transform()), batch_size=batch_size, num_workers=0)
        for images, _ in loader:
            yield images.to(device)

    def eval_transform(self) -> Callable:
        return create_transform(
            self.input_size,
            is_training=False,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        return normalize(images, torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))


def load_image_data(recipe: Recipe) -> ImageData:
    """Load the recipe's dataset, carve a seeded validation split from train, apply the sample caps."""
    try:
        splits = load_dataset(resolve_dataset(recipe.dataset), recipe.dataset_config)
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
    if len(train_ds) == 0 or len(test_ds) == 0:
        raise RecipeError(f"dataset {recipe.dataset!r}: the train or test split is empty")
    mode = _image_mode(train_ds, image_col)
    if recipe.augment == "timm":
        train: Split = StreamedSplit(train_ds, image_col, mode, torch.tensor(train_ds[label_col]))
        test: Split = StreamedSplit(test_ds, image_col, mode, torch.tensor(test_ds[label_col]))
    else:
        train = _to_tensors(train_ds, image_col, label_col, mode)
        test = _to_tensors(test_ds, image_col, label_col, mode)
    if recipe.exclude_classes:
        train, test, label_names = _exclude_classes(train, test, list(label_names), recipe.exclude_classes)
    test = test.head(recipe.max_test_samples)
    # normalisation statistics of the whole train split, before the seeded carve: runs of one recipe
    # with different seeds then preprocess alike, so their members can be merged (DST)
    stats = _channel_stats(train.images) if isinstance(train, ImageSplit) else None
    val = None
    if recipe.val_size:
        if recipe.val_size >= len(train):
            raise RecipeError(f"val_size {recipe.val_size} leaves no training images (train has {len(train)})")
        carve = validation_carve(len(train), recipe.val_size, recipe.seed)
        val, train = _subset(train, carve.val), _subset(train, carve.train)
    train = train.head(recipe.max_train_samples)
    if isinstance(train, StreamedSplit) or stats is None:
        return _streamed_data(recipe, train, val, test, list(label_names), mode)
    return ImageData(train, val, test, list(label_names), tuple(train.images.shape[1:]), *stats)


def _exclude_classes(
    train: Split, test: Split, label_names: list[str], excluded: Sequence[str]
) -> tuple[Split, Split, list[str]]:
    """Drop the rows of the ``excluded`` classes from both splits and renumber the rest in their order.

    Raises:
        RecipeError: a name is not one of ``label_names``, or nothing would be left to train on.
    """
    unknown = [name for name in excluded if name not in label_names]
    if unknown:
        raise RecipeError(f"recipe key 'exclude_classes': {unknown} are not classes of the dataset {label_names}")
    kept = [name for name in label_names if name not in excluded]
    if len(kept) < 2:
        raise RecipeError(f"recipe key 'exclude_classes' leaves {len(kept)} class(es); a classifier needs two")
    new_ids = torch.full((len(label_names),), -1, dtype=torch.long)
    new_ids[[label_names.index(name) for name in kept]] = torch.arange(len(kept))

    def keep(split: Split) -> Split:
        labels = new_ids[split.labels]
        rows = (labels >= 0).nonzero().squeeze(1)
        if isinstance(split, StreamedSplit):
            return StreamedSplit(split.table.select(rows.tolist()), split.image_col, split.mode, labels[rows])
        return ImageSplit(split.images[rows], labels[rows])

    return keep(train), keep(test), kept


def _channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 ``(N, C, H, W)`` images in [0, 1] units, in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].to(torch.float64).div_(255)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.float().tolist()), tuple(std.float().tolist())


def _subset(split: Split, indices: torch.Tensor) -> Split:
    if isinstance(split, StreamedSplit):
        return split.subset(indices)
    return ImageSplit(split.images[indices], split.labels[indices])


def _streamed_data(
    recipe: Recipe, train: StreamedSplit, val: Split | None, test: Split, label_names: list[str], mode: str
) -> ImageData:
    """timm's ImageNet-style pipeline: random-resized crop, flip, optional auto-augment; timm's mean/std."""
    assert recipe.image_size is not None  # the recipe refuses augment "timm" without it
    channels = 1 if mode == "L" else 3
    input_size = (channels, recipe.image_size, recipe.image_size)
    mean = IMAGENET_DEFAULT_MEAN if channels == 3 else (0.5,)
    std = IMAGENET_DEFAULT_STD if channels == 3 else (0.5,)
    transform = timm_train_transform(recipe, input_size, mean, std, "bilinear")
    return ImageData(
        train, val, test, label_names, input_size, tuple(mean), tuple(std), 0.875, "bilinear", train_transform=transform
    )


def _columns(ds: Dataset, recipe: Recipe) -> tuple[str, str]:
    features = ds.features
    image_col = recipe.image_column or next((k for k, v in features.items() if isinstance(v, Image)), None)
    label_col = recipe.label_column or next((k for k, v in features.items() if isinstance(v, ClassLabel)), None)
    for key, column, kind in (("image_column", image_col, Image), ("label_column", label_col, ClassLabel)):
        if column is not None and getattr(recipe, key) and column not in features:
            raise RecipeError(
                f"recipe key {key!r}: dataset {recipe.dataset!r} has no column {column!r} ({list(features)})"
            )
        if column is None or not isinstance(features[column], kind):
            found = f"column {column!r} is {type(features[column]).__name__}, not " if column else "no "
            raise RecipeError(
                f"{found}{kind.__name__} column in dataset {recipe.dataset!r} (columns: {list(features)}); "
                f"set `{key}` in the recipe"
            )
    return image_col, label_col


def _image_mode(ds: Dataset, image_col: str) -> str:
    """Grayscale data stays one channel; anything else becomes RGB."""
    return "L" if ds[0][image_col].mode in ("L", "1", "I;16") else "RGB"


def _to_tensors(ds: Dataset, image_col: str, label_col: str, mode: str) -> ImageSplit:
    images = decode_images(ds, image_col, mode)  # (N, H, W) or (N, H, W, C)
    if images.dtype == object:
        raise RecipeError(f"images in column {image_col!r} have different sizes: use `augment: timm` with `image_size`")
    return ImageSplit(channels_first(images), torch.from_numpy(ds.with_format("numpy")[label_col][:]).long())


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


def timm_train_transform(
    recipe: Recipe | Any, input_size: tuple[int, ...], mean: Sequence[float], std: Sequence[float], interpolation: str
) -> Callable[[Any], Any]:
    """timm's training pipeline for streamed images with ``recipe``'s ``auto_augment`` and ``color_jitter``.

    ``recipe`` is a training or fine-tuning recipe (both name those keys the same way).
    """
    return create_transform(
        input_size,
        is_training=True,
        auto_augment=recipe.auto_augment,
        color_jitter=recipe.color_jitter,
        mean=mean,
        std=std,
        interpolation=interpolation,
    )
