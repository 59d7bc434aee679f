"""Common image corruptions at severities 1–5, for robustness evaluation on any image dataset.

Modelled on ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), with their CIFAR-10-C
parameters, implemented in numpy and PIL. Each image is corrupted on its own with a generator seeded
by ``(seed, corruption, severity, image index)``, so results do not depend on batching or on how
many processes share the work. Pixel values are in [0, 1] inside each function.

=================  ===============================================  ==============================
name               what it does                                     parameter at severity 1..5
=================  ===============================================  ==============================
gaussian_noise     add N(0, σ²) per pixel                           σ = .04 .06 .08 .09 .10
shot_noise         Poisson photon noise: Poisson(x·λ) / λ           λ = 500 250 100 75 50
impulse_noise      salt and pepper: share p of values set to 0 / 1  p = .01 .02 .03 .05 .07
defocus_blur       disk kernel of radius r, anti-aliased by a       (r, s) = (.3,.4) (.4,.5) (.5,.6)
                   3×3 Gaussian of std s                            (1,.2) (1.5,.1)
gaussian_blur      Gaussian blur of std σ pixels (PIL)              σ = .4 .6 .7 .8 1.0
contrast           (x − mean) · c + mean                            c = .75 .5 .4 .3 .15
brightness         value channel (HSV) + b                          b = .05 .1 .15 .2 .3
pixelate           box-downsample to a share f of the size, and up  f = .95 .9 .85 .75 .65
jpeg_compression   JPEG round trip at quality q (PIL)               q = 80 65 58 50 40
=================  ===============================================  ==============================
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

__all__ = ["CORRUPTIONS", "SEVERITIES", "CorruptionTransform", "corrupt"]

SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, sigma, x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _defocus_blur(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, alias_std = params
    reach = int(np.ceil(radius)) + 1
    grid = np.arange(-reach, reach + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    gauss = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_std**2))
    kernel = _convolve(disk[..., None], np.outer(gauss, gauss), mode="constant")[..., 0]
    return _convolve(x, kernel / kernel.sum())


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _via_pil(x, lambda image: image.filter(ImageFilter.GaussianBlur(radius=sigma)))


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean()
    return (x - mean) * factor + mean


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    if x.shape[-1] == 1:  # grayscale: the value channel is the image
        return x + shift
    hsv = np.asarray(_to_pil(x).convert("HSV"), dtype=np.float64) / 255.0
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0.0, 1.0)
    rgb = Image.fromarray(np.round(hsv * 255.0).astype(np.uint8), mode="HSV").convert("RGB")
    return np.asarray(rgb, dtype=np.float64) / 255.0


def _pixelate(x: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    def pixelate(image: Image.Image) -> Image.Image:
        small = (max(1, int(image.width * share)), max(1, int(image.height * share)))
        return image.resize(small, Image.Resampling.BOX).resize(image.size, Image.Resampling.BOX)

    return _via_pil(x, pixelate)


def _jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    def round_trip(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            return decoded.convert(image.mode)

    return _via_pil(x, round_trip)


# name -> (function, its parameter at severities 1..5)
CORRUPTIONS: dict[str, tuple[Callable[[np.ndarray, Any, np.random.Generator], np.ndarray], tuple[Any, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (_defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))),
    "gaussian_blur": (_gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "jpeg_compression": (_jpeg_compression, (80, 65, 58, 50, 40)),
}


def corrupt(image: torch.Tensor, name: str, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to one uint8 image ``(C, H, W)``.

    Example:
        >>> image = torch.full((1, 8, 8), 128, dtype=torch.uint8)
        >>> corrupt(image, "contrast", 5, np.random.default_rng(0)).unique().tolist()  # a flat image stays flat
        [128]
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    function, params = CORRUPTIONS[name]
    x = image.permute(1, 2, 0).numpy().astype(np.float64) / 255.0  # (H, W, C)
    out = function(x, params[severity - 1], rng)
    out = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


class CorruptionTransform:
    """``(image, index) -> corrupted image``, seeded per image; an ``ImageTransform`` for ``run_inference``."""

    def __init__(self, name: str, severity: int, seed: int = 0) -> None:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
        self.name, self.severity, self.seed = name, severity, seed
        self._key = zlib.crc32(name.encode())  # stable across runs, unlike hash()

    def __call__(self, image: torch.Tensor, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self._key, self.severity, index])
        return corrupt(image, self.name, self.severity, rng)


def _convolve(x: np.ndarray, kernel: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """Same-size 2-D convolution of ``(H, W, C)`` with a small odd-sized kernel (edges padded by ``mode``)."""
    ky, kx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, ((ky, ky), (kx, kx), (0, 0)), mode=mode)
    out = np.zeros_like(x, dtype=np.float64)
    height, width = x.shape[:2]
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            out += kernel[dy, dx] * padded[dy : dy + height, dx : dx + width]
    return out


def _to_pil(x: np.ndarray) -> Image.Image:
    pixels = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _via_pil(x: np.ndarray, operation: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    array = np.asarray(operation(_to_pil(x)), dtype=np.float64) / 255.0
    return array[..., None] if array.ndim == 2 else array
