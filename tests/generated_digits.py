"""A generated digit-like task: 28×28 grey digits drawn with Pillow's FreeType font, seeded.

Each image draws one of ``0``–``9`` at a random size, offset, stroke width and rotation, then adds a
little Gaussian noise. A mirrored 2 or 5 is another digit, so the task punishes flip augmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

__all__ = ["digit_images", "write_generated_digits"]

SIZE = 28


def digit_images(count: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """``count`` uint8 ``(28, 28)`` digit images and their labels (classes in turn, so balanced)."""
    images, labels = [], []
    for index in range(count):
        digit = index % 10
        canvas = PILImage.new("L", (SIZE, SIZE), 0)
        font = ImageFont.load_default(size=int(rng.integers(13, 25)))  # FreeType (Pillow >= 10.1)
        x, y = (SIZE // 2 + int(rng.integers(-4, 5)) for _ in range(2))
        stroke = int(rng.integers(0, 2))
        ImageDraw.Draw(canvas).text(
            (x, y), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
        )
        canvas = canvas.rotate(float(rng.uniform(-25, 25)), resample=PILImage.BILINEAR)
        noisy = np.asarray(canvas, dtype=np.float64) + rng.normal(0, 40, (SIZE, SIZE))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels.append(digit)
    return images, labels


def write_generated_digits(root: Path, *, train: int, test: int, seed: int = 0) -> Path:
    """``root/data/{train,test}-00000-of-00001.parquet`` of generated digits, for ``datasets.load_dataset``."""
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = digit_images(count, rng)
        ds = Dataset.from_dict({"image": images, "label": labels}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root
