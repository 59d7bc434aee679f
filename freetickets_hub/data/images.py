"""Images from any ``datasets`` source, or a built-in one, as uint8 tensors: the one image loader.

:func:`load_eval_split` gives a split at a model's size (evaluation, calibration, export); training
decodes with :func:`decode_images` at the data's own size, and fine-tuning fits those tensors to
the base model's input with :func:`fit_images`.

Images are converted to the model's channel count (any PIL mode converts to grayscale or RGB; an
array with 2 or more than 4 channels does not) and brought to its input size with the same resize
and centre crop that :func:`~freetickets_hub.engines.preprocessing.preprocess` applies, so the
numbers match what ``EnsembleModel.predict`` would do. Labels are mapped onto the model's
``label_names``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.errors import ConfigError, DatasetError

from .sources import BUILTIN_SOURCES, load_split

__all__ = [
    "UNKNOWN_LABEL",
    "EvalSplit",
    "channels_first",
    "decode_images",
    "fit_images",
    "is_input_sized",
    "load_eval_split",
]

_CHUNK = 1024  # images resized per call, to bound the float32 working memory
UNKNOWN_LABEL = -1  # label of a class the model does not know (``load_eval_split(..., keep_unknown_classes=True)``)


@dataclass
class EvalSplit:
    """One split of images ready for the model, with labels as the model's class indices."""

    source: str  # as the user named it: a Hub id, a folder or a built-in name
    split: str
    images: torch.Tensor  # (N, C, H, W) uint8 at the model's input size
    labels: torch.Tensor | None  # (N,) int64 model class indices; None for an unlabelled OOD set
    unknown_classes: tuple[str, ...] = ()  # the source's classes the model does not know (labelled UNKNOWN_LABEL)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def description(self) -> str:
        return f"{self.source}:{self.split} ({len(self)} images)"


def load_eval_split(
    source: str,
    config: EnsembleConfig,
    *,
    split: str = "test",
    dataset_config: str | None = None,
    max_samples: int | None = None,
    require_labels: bool = True,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    keep_unknown_classes: bool = False,
) -> EvalSplit:
    """Load one split of ``source`` for the model described by ``config``.

    Args:
        source: a ``datasets.load_dataset`` path (Hub id or folder) or a name in ``BUILTIN_SOURCES``.
        config: the model's config (channels, input size, label names).
        split: a split name, with ``datasets`` slicing if wanted (``"train[:5000]"``).
        dataset_config: the ``datasets`` configuration name, if the source has several.
        max_samples: keep a seeded random subset of this many images (order preserved).
        require_labels: check and map labels (off for out-of-distribution sets, whose labels are ignored).
        seed: seed of the ``max_samples`` subset.
        rows: evaluate only these rows of the split (e.g. a training run's validation carve).
        keep_unknown_classes: label images of classes the model does not know ``UNKNOWN_LABEL`` and list
            those classes in ``unknown_classes`` (a near-OOD set), instead of refusing the dataset.

    Raises:
        DatasetError: unknown source or split, empty split, labels that differ from the model's, or
            images that cannot be converted to the model's channel count.
    """
    if max_samples is not None and max_samples < 1:
        raise DatasetError(f"max_samples must be at least 1, got {max_samples}")
    if source in BUILTIN_SOURCES:
        if split != "test":
            raise DatasetError(f"built-in dataset {source!r} has only the split 'test', got {split!r}")
        images, labels, names = BUILTIN_SOURCES[source]()
        keep = _subset(len(images), max_samples, seed)
        pixels = _fit_arrays(images[keep], config, f"{source}:{split}")
        if not require_labels:
            return EvalSplit(source, split, pixels, None)
        label_ids, unknown = _map_labels(torch.from_numpy(labels[keep]), names, config, source, keep_unknown_classes)
        return EvalSplit(source, split, pixels, label_ids, unknown)
    ds = load_split(source, split, dataset_config)
    if rows is not None:
        ds = ds.select(list(rows))
    if len(ds) == 0:
        raise DatasetError(f"dataset {source!r} split {split!r} is empty")
    ds = ds.select(_subset(len(ds), max_samples, seed))
    image_col, label_col = _columns(ds, source, require_labels)
    pixels = _decode(ds, image_col, config, f"{source}:{split}")
    if not require_labels:
        return EvalSplit(source, split, pixels, None)
    assert label_col is not None  # _columns raised otherwise
    names = ds.features[label_col].names
    ids = torch.as_tensor(np.asarray(ds[label_col][:]), dtype=torch.long)
    labels, unknown = _map_labels(ids, names, config, source, keep_unknown_classes)
    return EvalSplit(source, split, pixels, labels, unknown)


def _subset(size: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset (sorted, so the source order is kept), or all of them."""
    if max_samples is None or max_samples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, max_samples, replace=False))


def _columns(ds: Any, source: str, require_labels: bool) -> tuple[str, str | None]:
    import datasets

    features = ds.features
    image_types = (datasets.Image, datasets.Array2D, datasets.Array3D)
    image_col = next((k for k, v in features.items() if isinstance(v, image_types)), None)
    label_col = next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    if image_col is None:
        raise DatasetError(
            f"dataset {source!r} has no image column (an Image or Array feature); columns: {dict(features)}"
        )
    if require_labels and label_col is None:
        raise DatasetError(
            f"dataset {source!r} has no ClassLabel column; columns: {dict(features)}. Cast the label column, "
            "e.g. ds.cast_column('label', ClassLabel(names=[...]))"
        )
    return image_col, label_col


def decode_images(ds: Any, image_col: str, mode: str) -> np.ndarray:
    """The images of an ``Image`` column decoded in PIL ``mode`` ("L" or "RGB", any source mode converts):
    uint8 ``(N, H, W[, C])``, or an object array of images when their sizes differ."""
    import datasets

    ds = ds.cast_column(image_col, datasets.Image(mode=mode))
    return ds.with_format("numpy")[image_col][:]


def channels_first(array: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> a ``(N, C, H, W)`` tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def is_input_sized(height_width: Sequence[int], pretrained_cfg: Mapping[str, Any]) -> bool:
    """True when images of this size already have the input size and the eval transform would not touch them."""
    _, height, width = pretrained_cfg["input_size"]
    crop_pct = float(pretrained_cfg.get("crop_pct") or 1.0)
    return tuple(height_width) == (height, width) and int(min(height, width) / crop_pct) == min(height, width)


def fit_images(images: Sequence[Any], pretrained_cfg: Mapping[str, Any]) -> torch.Tensor:
    """PIL images or uint8 arrays resized and cropped exactly as ``preprocess`` does, in uint8 (not normalised)."""
    channels = pretrained_cfg["input_size"][0]
    identity = {**pretrained_cfg, "mean": [0.0] * channels, "std": [1.0] * channels}
    chunks = [preprocess(list(images[i : i + _CHUNK]), identity) for i in range(0, len(images), _CHUNK)]
    # preprocess gives uint8 / 255 in float32, which maps back to the same uint8 exactly
    return torch.from_numpy(np.round(np.concatenate(chunks) * 255.0).astype(np.uint8))


def _decode(ds: Any, image_col: str, config: EnsembleConfig, where: str) -> torch.Tensor:
    import datasets

    feature = ds.features[image_col]
    if isinstance(feature, datasets.Image):
        target = _pil_mode(config, where)
        array = decode_images(ds, image_col, target)
        if array.dtype == object or not is_input_sized(array.shape[1:3], config.pretrained_cfg):
            pil_images = list(ds.cast_column(image_col, datasets.Image(mode=target))[image_col][:])
            return fit_images(pil_images, config.pretrained_cfg)  # mixed sizes, or not yet resized
        return channels_first(array)
    array = np.asarray(ds.with_format("numpy")[image_col][:])
    if feature.dtype == "uint8":  # the numpy formatter widens uint8 arrays to int64
        array = array.astype(np.uint8)
    return _fit_arrays(array, config, where)


def _pil_mode(config: EnsembleConfig, where: str) -> str:
    if "input_size" not in config.pretrained_cfg:
        raise ConfigError("the model's config has no pretrained_cfg.input_size, so its input is unknown")
    channels = config.pretrained_cfg["input_size"][0]
    if channels not in (1, 3):
        raise DatasetError(
            f"{where}: the model takes {channels}-channel input; only 1- or 3-channel models can be evaluated"
        )
    return "L" if channels == 1 else "RGB"


def _fit_arrays(images: np.ndarray, config: EnsembleConfig, where: str) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or channels-last ``(N, H, W, C)`` arrays -> the model's channels and size."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(f"{where}: expected uint8 images of shape (N, H, W[, C]), got {images.dtype} {images.shape}")
    channels = 1 if images.ndim == 3 else images.shape[-1]
    wanted = _pil_mode(config, where)
    if channels not in (1, 3, 4):
        raise DatasetError(
            f"{where}: images have {channels} channels, which cannot be converted to the model's "
            f"{'grayscale' if wanted == 'L' else 'RGB'} input (only 1-, 3- and 4-channel images can)"
        )
    if images.ndim == 4 and channels == 1:
        images = images[..., 0]
    sized = is_input_sized(images.shape[1:3], config.pretrained_cfg)
    if (1 if images.ndim == 3 else channels) == len(wanted) and sized:
        return channels_first(images)
    from PIL import Image

    return fit_images([Image.fromarray(image) for image in images], config.pretrained_cfg)


def _map_labels(
    labels: torch.Tensor, names: list[str], config: EnsembleConfig, source: str, keep_unknown: bool = False
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Dataset class indices -> model class indices by label name, and the dataset's classes the model lacks.

    The two label sets must be equal; with ``keep_unknown`` the dataset may also have classes the
    model does not know, whose images get ``UNKNOWN_LABEL``.
    """
    model_names = config.label_names
    if model_names is None:
        if len(names) != config.num_classes:
            raise DatasetError(
                f"dataset {source!r} has {len(names)} classes, the model {config.num_classes} (and no label_names)"
            )
        return labels, ()
    missing, extra = sorted(set(model_names) - set(names)), [name for name in names if name not in model_names]
    if missing or (extra and not keep_unknown):
        hint = (
            f"; to evaluate on the model's classes and score {extra} as near-OOD, pass `--ood-dataset held-out` "
            "to `freetickets evaluate` (keep_unknown_classes=True here)"
            if extra and not missing
            else ""
        )
        raise DatasetError(
            f"dataset {source!r} has labels {names}, the model has {model_names} "
            f"(the dataset lacks {missing}, and has {extra} that the model does not know){hint}"
        )
    lookup = torch.tensor([model_names.index(n) if n in model_names else UNKNOWN_LABEL for n in names])
    return lookup[labels], tuple(extra)
