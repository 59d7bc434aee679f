"""``/v1/predict`` payloads: uploaded or base64 images in, one JSON record per image out.

Images are decoded from the bytes sent (never fetched from a URL) with PIL, preprocessed as the
model's ``pretrained_cfg`` says (``freetickets_hub.engines.preprocessing``, the engines' own path) and
answered by ``records``, the one place per-image JSON is built.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.engines.preprocessing import open_image, preprocess
from freetickets_hub.errors import ImageError
from freetickets_hub.uncertainty.predictions import Predictions

from .errors import InvalidInput

__all__ = ["decode_base64_images", "decode_images", "parse_top_k", "records"]


def decode_images(blobs: Sequence[tuple[str, bytes]], config: EnsembleConfig) -> np.ndarray:
    """``(name, encoded bytes)`` pairs -> ``pixel_values`` ``(B, C, H, W)`` float32.

    Raises:
        InvalidInput: a blob is empty, not in ``ALLOWED_FORMATS``, broken, or over a size limit
            (``freetickets_hub.engines.preprocessing``: checked before it is decoded or resized).
    """
    images = []
    for i, (name, blob) in enumerate(blobs):
        where = f"image {i} ({name})" if name else f"image {i}"
        if not blob:
            raise InvalidInput(f"{where} is empty")
        try:
            images.append(open_image(io.BytesIO(blob), name=f"{where}, {len(blob)} bytes"))
        except ImageError as err:
            raise InvalidInput(str(err)) from None
    try:
        return preprocess(images, config.pretrained_cfg)
    except (OSError, ValueError) as err:  # e.g. a mode PIL cannot convert to the model's channels
        raise InvalidInput(f"the images cannot be preprocessed for this model: {err}") from None


def decode_base64_images(payload: Any) -> list[tuple[str, bytes]]:
    """``{"images": [base64 or data-URL strings]}`` -> ``(name, bytes)`` pairs.

    Raises:
        InvalidInput: not that shape, or a string that is not base64.
    """
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(x, str) for x in images):
        raise InvalidInput('a JSON body must be {"images": ["<base64>", ...]} with one or more strings')
    blobs = []
    for i, text in enumerate(images):
        encoded = text.partition(",")[2] if text.startswith("data:") else text
        if not encoded:
            raise InvalidInput(f"images[{i}] holds no data (a data URL needs ';base64,' and the image after it)")
        try:
            blobs.append((f"images[{i}]", base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError) as err:
            raise InvalidInput(f"images[{i}] is not valid base64 ({err})") from None
    return blobs


def parse_top_k(value: str | None, num_classes: int) -> int:
    """``?top_k=`` as an integer from 1 to the number of classes (default 5, or fewer classes)."""
    if value is None:
        return min(5, num_classes)
    try:
        top_k = int(value)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= num_classes or str(top_k) != value.strip():
        raise InvalidInput(f"top_k must be an integer from 1 to {num_classes} (the number of classes), got {value!r}")
    return top_k


def records(outputs: dict[str, np.ndarray], config: EnsembleConfig, top_k: int) -> list[dict[str, Any]]:
    """One JSON record per image: ``Predictions.to_records`` fields plus each member's vote.

    ``member_votes`` lists, per member, its top-1 label and that label's probability under the
    member (from ``member_probs`` ``(M, B, K)``).
    """
    predictions = Predictions.from_outputs(outputs, config.label_names, config.ensemble.selective)
    rows = predictions.to_records(top_k=top_k)
    member_probs = outputs["member_probs"]  # (M, B, K)
    votes = member_probs.argmax(-1)  # (M, B)
    for b, row in enumerate(rows):
        row["member_votes"] = [
            {"label": _name(config, int(k)), "label_id": int(k), "probability": float(member_probs[m, b, k])}
            for m, k in enumerate(votes[:, b])
        ]
    return rows


def _name(config: EnsembleConfig, label_id: int) -> str:
    return config.label_names[label_id] if config.label_names else str(label_id)
