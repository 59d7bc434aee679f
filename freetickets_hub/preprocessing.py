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

__all__ = ["ImageInput", "check_pixel_shape", "load_images", "preprocess"]

ImageInput = Image.Image | np.ndarray | str | os.PathLike

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA: what the last axis of an (H, W, C) image holds


def load_images(images: ImageInput | Sequence[ImageInput], channels: int) -> list[Image.Image]:
    """Turn PIL images, uint8 arrays or file paths into PIL images of ``channels``.

    A numpy array is one image ``(H, W)`` or ``(H, W, C)`` (C = 1, 3 or 4), or a batch ``(B, H, W)``
    or ``(B, H, W, C)``; channels-first arrays are refused where which axis is which would be a guess.
    A list may mix all of these kinds of single images; an empty list gives no images.

    Raises:
        ValueError: an array of another dtype, rank or layout.
        TypeError: something that is no image.
    """
    if isinstance(images, np.ndarray):
        images = _split_batch(images, channels)
    elif isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]  # one image
    out = []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                image = opened.copy()
        elif isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[-1] not in _CHANNELS)
            ):
                raise ValueError(
                    f"image {i}: expected a uint8 array of shape (H, W) or (H, W, C) with C in {_CHANNELS}, "
                    f"got {image.dtype} {image.shape}"
                )
            image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
        elif not isinstance(image, Image.Image):
            raise TypeError(
                f"image {i}: expected a PIL image, a numpy array or a file path, got {type(image).__name__}"
            )
        out.append(image.convert("L" if channels == 1 else "RGB"))
    return out


def _split_batch(array: np.ndarray, channels: int) -> list[np.ndarray]:
    """One numpy array -> the list of its images (see :func:`load_images`).

    ``(3, H, W)`` reads as three gray images for a grayscale model, and is refused as channels-first
    for a colour model (for which one ``(1, H, W)`` image or batch of one is the same picture).
    """
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 image arrays, got {array.dtype} {array.shape}; scale to 0-255 first")
    channels_last = array.ndim >= 3 and array.shape[-1] in _CHANNELS
    if array.ndim == 2 or (array.ndim == 3 and channels_last):
        return [array]  # (H, W) or (H, W, C)
    if array.ndim == 3 and channels != 1 and array.shape[0] in _CHANNELS[1:]:
        raise ValueError(
            f"array of shape {array.shape} looks channels-first (C, H, W); pass (H, W, C) "
            "(array.transpose(1, 2, 0)), or a batch of gray images as (B, H, W, 1) or a list"
        )
    if array.ndim == 3 or (array.ndim == 4 and channels_last):
        return list(array)  # (B, H, W) or (B, H, W, C)
    if array.ndim == 4 and array.shape[1] in _CHANNELS:
        raise ValueError(
            f"array of shape {array.shape} looks channels-first (B, C, H, W); pass (B, H, W, C) "
            "(array.transpose(0, 2, 3, 1))"
        )
    raise ValueError(f"expected an image (H, W) / (H, W, C) or a batch (B, H, W) / (B, H, W, C), got {array.shape}")


def check_pixel_shape(shape: Sequence[int], input_size: Sequence[int]) -> None:
    """The one check both engines run on ``pixel_values`` before a forward pass (so they refuse alike).

    Args:
        shape: the batch's shape, expected ``(B, C, H, W)``.
        input_size: ``(C, H, W)`` from the config.

    Raises:
        ValueError: wrong rank, channels, height/width, or an empty batch.
    """
    shape = tuple(int(d) for d in shape)
    channels, height, width = (int(d) for d in input_size)
    expected = f"(B, {channels}, {height}, {width})"
    if len(shape) != 4:
        raise ValueError(f"pixel_values must have 4 dimensions {expected}, got shape {shape}")
    if shape[1] != channels:
        raise ValueError(
            f"pixel_values has {shape[1]} channels, expected {channels} (shape {shape}, expected {expected}); "
            "predict() preprocesses images for you"
        )
    if shape[2:] != (height, width):
        raise ValueError(
            f"pixel_values has height x width {shape[2]}x{shape[3]}, expected {height}x{width} "
            f"(shape {shape}, expected {expected}); predict() resizes images for you"
        )
    if shape[0] == 0:
        raise ValueError(f"pixel_values has an empty batch (shape {shape})")


def preprocess(images: ImageInput | Sequence[ImageInput], pretrained_cfg: dict[str, Any]) -> np.ndarray:
    """Images -> float32 ``(B, C, H, W)`` ready for the model described by ``pretrained_cfg`` (B may be 0)."""
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
    if not batch:
        return np.zeros((0, channels, height, width), dtype=np.float32)
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
