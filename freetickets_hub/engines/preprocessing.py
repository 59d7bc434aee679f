"""Image preprocessing from a config's timm ``pretrained_cfg``, in numpy and PIL only (no torch).

It reproduces timm's evaluation transform (resize the shorter side to ``size / crop_pct``, centre
crop, scale to [0, 1], normalise) so the torch and ONNX Runtime engines see identical inputs; a test
checks it against ``timm.data.create_transform``.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from freetickets_hub.errors import ImageError

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "MAX_RESIZE_PIXELS",
    "ImageInput",
    "batch_starts",
    "check_image_size",
    "check_pixel_shape",
    "load_images",
    "open_image",
    "preprocess",
]

ImageInput = Image.Image | np.ndarray | str | os.PathLike

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# Limits checked on the header, before any pixel is decoded or resized (a 2 KB 1x1,000,000 PNG would
# otherwise become a 28x28,000,000 intermediate): see the README's "Limits".
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # never EPS or Pillow's other readers
MAX_ASPECT_RATIO = 50  # longer side / shorter side
MAX_IMAGE_PIXELS = 40_000_000  # decoded width x height (a 6,300-pixel square)
MAX_RESIZE_PIXELS = 2**24  # width x height of the image resized to the model's shorter side
# what Pillow's readers raise on broken files besides OSError/ValueError (struct.error, IndexError, ...)
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, AttributeError, EOFError,
    NotImplementedError, ZeroDivisionError, OverflowError, struct.error,
)  # fmt: skip

_CHANNELS = (1, 2, 3, 4)  # gray, gray+alpha, RGB, RGBA: what the last axis of an (H, W, C) image holds


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
            image = open_image(image, name=str(image))
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
        out.append(_to_8_bit(image, name=f"image {i}").convert("L" if channels == 1 else "RGB"))
    return out


def _to_8_bit(image: Image.Image, *, name: str) -> Image.Image:
    """16-bit gray (``I;16*``, ``I``) scaled to 0-255 (``convert("L")`` would saturate it); float refused.

    Raises:
        ImageError: a float image (mode ``F``: no fixed range), or 32-bit values outside 0-65535.
    """
    if image.mode == "F":
        raise ImageError(f"{name}: a floating-point image (mode F) has no fixed range; save it as 8- or 16-bit")
    if not image.mode.startswith("I"):
        return image
    array = np.asarray(image)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageError(f"{name}: a 32-bit image (mode {image.mode}) with values outside 0-65535; save it as 16-bit")
    return Image.fromarray(np.round(array.astype(np.float32) / 257.0).astype(np.uint8))


def open_image(source: str | os.PathLike | IO[bytes], *, name: str) -> Image.Image:
    """Decode one image file or stream, refusing before decoding what would cost too much.

    Only :data:`ALLOWED_FORMATS` are read; the size is checked on the header (:func:`check_image_size`);
    a JPEG over :data:`MAX_IMAGE_PIXELS` is decoded at a reduced scale (``draft``) rather than refused.

    Raises:
        ImageError: not an allowed format, broken or truncated, or over a limit; the message starts with ``name``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=ALLOWED_FORMATS) as opened:
                if opened.format == "JPEG" and opened.width * opened.height > MAX_IMAGE_PIXELS:
                    scale = math.sqrt(MAX_IMAGE_PIXELS / (opened.width * opened.height))
                    opened.draft(opened.mode, (int(opened.width * scale), int(opened.height * scale)))
                check_image_size(opened.size, name=name)
                opened.load()
                return opened.copy()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a {', '.join(ALLOWED_FORMATS)} image") from None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # Pillow's check, on the header
        raise ImageError(
            f"{name}: the image is over the limit of {MAX_IMAGE_PIXELS:,} pixels ({_without_repr(err)})"
        ) from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name}: a broken or truncated {_format_of(source)}image ({_without_repr(err)})") from None


def check_image_size(size: Sequence[int], *, name: str, pretrained_cfg: dict[str, Any] | None = None) -> None:
    """Refuse an image whose size (width, height) is empty or over a limit, before it is decoded or resized.

    Raises:
        ImageError: naming the limit (:data:`MAX_ASPECT_RATIO`, :data:`MAX_IMAGE_PIXELS`, and with
            ``pretrained_cfg`` :data:`MAX_RESIZE_PIXELS` of the image resized for that model).
    """
    width, height = (int(d) for d in size)
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is {width}x{height} pixels, it has no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name}: the image is {width}x{height} pixels; its aspect ratio "
            f"{max(width, height) / min(width, height):.0f}:1 is over the limit of {MAX_ASPECT_RATIO}:1"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: the image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS:,} pixels"
        )
    if pretrained_cfg is not None:
        resized = _resized_size((width, height), _shorter_side(pretrained_cfg))
        if resized[0] * resized[1] > MAX_RESIZE_PIXELS:
            raise ImageError(
                f"{name}: the image is {width}x{height} pixels; resized for this model it would be "
                f"{resized[0]}x{resized[1]}, over the limit of {MAX_RESIZE_PIXELS:,} pixels"
            )


def _format_of(source: object) -> str:
    return f"{os.path.splitext(source)[1].lstrip('.').upper()} " if isinstance(source, (str, os.PathLike)) else ""


def _without_repr(err: BaseException) -> str:
    """The error's text without the in-memory stream's repr (``<_io.BytesIO object at 0x...>``)."""
    text = str(err) or type(err).__name__
    return text.split(" <_io.")[0] if " <_io." in text else text


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


def batch_starts(count: int, batch_size: int) -> range:
    """The first index of each ``batch_size`` chunk of ``count`` images.

    Raises:
        ValueError: ``batch_size`` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return range(0, count, batch_size)


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
    resample = _RESAMPLE.get(pretrained_cfg.get("interpolation", "bilinear"), Image.Resampling.BILINEAR)
    mean = np.asarray(pretrained_cfg.get("mean", (0.0,) * channels), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pretrained_cfg.get("std", (1.0,) * channels), dtype=np.float32).reshape(-1, 1, 1)
    shorter = _shorter_side(pretrained_cfg)
    batch = []
    for i, image in enumerate(load_images(images, channels)):
        check_image_size(image.size, name=f"image {i}", pretrained_cfg=pretrained_cfg)
        image = _resize_shorter(image, shorter, resample)
        image = _center_crop(image, height, width)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        batch.append((array - mean) / std)
    if not batch:
        return np.zeros((0, channels, height, width), dtype=np.float32)
    return np.stack(batch).astype(np.float32)


def _shorter_side(pretrained_cfg: dict[str, Any]) -> int:
    """The length timm resizes the shorter side to: ``min(H, W) / crop_pct``."""
    _, height, width = pretrained_cfg["input_size"]
    return math.floor(min(height, width) / float(pretrained_cfg.get("crop_pct") or 1.0))


def _resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    w, h = size
    return (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)


def _resize_shorter(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    if min(image.size) == size:
        return image
    return image.resize(_resized_size(image.size, size), resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    w, h = image.size
    if w < width or h < height:
        image = image.resize((max(w, width), max(h, height)))
        w, h = image.size
    top = round((h - height) / 2.0)
    left = round((w - width) / 2.0)
    return image.crop((left, top, left + width, top + height))
