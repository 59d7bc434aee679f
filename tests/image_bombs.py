"""Hostile image files for the hardening tests, built by hand so that building them costs nothing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An all-black 1-bit PNG of ``width`` x ``height`` (1 x 1,000,000 is about 2 KB).

    ``rows``: store only that many rows (a header that promises more than the file holds).
    """
    data = zlib.compress((b"\x00" + bytes((width + 7) // 8)) * (height if rows is None else rows), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encoded(fmt: str, seed: int = 0, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    """A random image of ``size`` saved as ``fmt``."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return save(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), fmt, mode)


def real_digit(index: int, fmt: str, mode: str = "L") -> bytes:
    """scikit-learn's bundled handwritten digit ``index`` (a real image, 8x8 grown to 28x28) saved as ``fmt``."""
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[index] * (255 / 16)).astype(np.uint8)
    return save(Image.fromarray(pixels).resize((28, 28), Image.Resampling.BILINEAR), fmt, mode)


def save(image: Image.Image, fmt: str, mode: str = "L") -> bytes:
    """``image`` converted to ``mode`` and encoded as ``fmt``."""
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def mutations(blob: bytes, seed: int, count: int) -> list[bytes]:
    """``count`` seeded mutations of ``blob``: flipped bytes, truncations, spliced chunks, zeroed spans."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        data = bytearray(blob)
        kind = rng.integers(4)
        if kind == 0:
            for pos in rng.integers(0, len(data), rng.integers(1, 9)):
                data[pos] = int(rng.integers(256))
        elif kind == 1:
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == 2:
            start = int(rng.integers(0, len(data)))
            data[start:start] = data[: int(rng.integers(1, 64))]
        else:
            start = int(rng.integers(8, max(9, len(data))))
            data[start : start + int(rng.integers(1, 32))] = bytes(32)
        out.append(bytes(data))
    return out
