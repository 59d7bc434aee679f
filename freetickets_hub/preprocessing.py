"""Image preprocessing from a config's timm ``pretrained_cfg``, in numpy and PIL only (no torch).

It reproduces timm's evaluation transform (resize the shorter side to ``size / crop_pct``, centre
crop, scale to [0, 1], normalise) so the torch and ONNX Runtime engines see identical inputs; a test
checks it against ``timm.data.create_transform``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ImageInput", "load_images", "preprocess"]

ImageInput = Image.Image | np.ndarray | str | os.PathLike

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_images(images: ImageInput | Sequence[ImageInput], channels: int) -> list[Image.Image]:
    """Turn PIL images, ``HxW``/``HxWxC`` uint8 arrays or file paths into PIL images of ``channels``."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        images = [images]  # one image
    out = []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                image = opened.copy()
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"image {i}: expected a uint8 array of shape (H, W) or (H, W, C), got {image.dtype} {image.shape}"
                )
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        elif not isinstance(image, Image.Image):
            raise TypeError(
                f"image {i}: expected a PIL image, a numpy array or a file path, got {type(image).__name__}"
            )
        out.append(image.convert("L" if channels == 1 else "RGB"))
    return out


def preprocess(images: ImageInput | Sequence[ImageInput], pretrained_cfg: dict[str, Any]) -> np.ndarray:
    """Images -> float32 ``(B, C, H, W)`` ready for the model described by ``pretrained_cfg``."""
    channels, height, width = pretrained_cfg["input_size"]
    crop_pct = float(pretrained_cfg.get("crop_pct") or 1.0)
    resample = _RESAMPLE.get(pretrained_cfg.get("interpolation", "bilinear"), Image.Resampling.BILINEAR)
    mean = np.asarray(pretrained_cfg.get("mean", (0.0,) * channels), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pretrained_cfg.get("std", (1.0,) * channels), dtype=np.float32).reshape(-1, 1, 1)
    batch = []
    for image in load_images(images, channels):
        image = _resize_shorter(image, math.floor(min(height, width) / crop_pct), resample)
        image = _center_crop(image, height, width)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        batch.append((array - mean) / std)
    return np.stack(batch).astype(np.float32)


def _resize_shorter(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    w, h = image.size
    if w < width or h < height:
        image = image.resize((max(w, width), max(h, height)))
        w, h = image.size
    top = round((h - height) / 2.0)
    left = round((w - width) / 2.0)
    return image.crop((left, top, left + width, top + height))
