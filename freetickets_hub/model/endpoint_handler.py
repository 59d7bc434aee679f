"""Inference Endpoints handler for a FreeTickets ensemble; ``save_pretrained`` writes it as ``handler.py``.

Inference Endpoints import ``handler.py`` from the model repository, build ``EndpointHandler(path)``
once and call it per request with ``{"inputs": <image>, "parameters": {"top_k": 5}}``. The image is
a PIL image (the toolkit decodes binary request bodies), raw bytes or a base64 string (optionally a
``data:image/...;base64,`` URL); a list of images gives a list of answers. Each answer is the
image-classification list of ``{"label", "score"}`` (best first), and every entry also carries the
ensemble's uncertainty for that image: ``entropy`` (total), ``expected_entropy`` (aleatoric),
``mutual_information`` (epistemic) and ``disagreement``. When the model stores a selective rule
(``config.ensemble.selective``), every entry also says whether the model abstains on the image (``abstain``)
and gives its conformal ``prediction_set`` (label names), as ``EnsembleModel.predict`` does.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from freetickets_hub import EnsembleModel, OnnxEnsemble

__all__ = ["EndpointHandler"]

VARIANT_ENV = "FREETICKETS_VARIANT"  # e.g. int8: serve onnx/model.int8.onnx
_UNCERTAINTY = ("entropy", "expected_entropy", "mutual_information", "disagreement")
_SELECTIVE = ("abstain", "prediction_set")  # present when the model stores a selective rule


class EndpointHandler:
    """Loads the ensemble in ``path`` (the repository folder) and classifies images with uncertainty.

    Args:
        path: the folder holding ``config.json`` and ``model.safetensors`` (default: the current one).
        variant: run an exported graph on ONNX Runtime instead, ``"fp32"`` (``onnx/model.onnx``) or
            ``"int8"`` (``onnx/model.int8.onnx``); default: the ``FREETICKETS_VARIANT`` environment
            variable (an endpoint's setting), else the PyTorch ensemble.
    """

    def __init__(self, path: str = "", variant: str | None = None) -> None:
        variant = variant or os.environ.get(VARIANT_ENV)
        if variant:
            self.model = OnnxEnsemble.from_pretrained(path or ".", variant=variant)
            return
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = EnsembleModel.from_pretrained(path or ".", map_location=device)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if "inputs" not in data:
            raise ValueError(f"expected a request with an 'inputs' image, got keys {sorted(data)}")
        inputs = data["inputs"]
        num_classes = self.model.config.num_classes
        top_k = (data.get("parameters") or {}).get("top_k", min(5, num_classes))
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_classes:
            raise ValueError(f"parameters.top_k must be an integer from 1 to {num_classes} classes, got {top_k!r}")
        images = [_to_image(x) for x in inputs] if isinstance(inputs, list) else [_to_image(inputs)]
        records = self.model.predict(images).to_records(top_k=top_k)
        answers = []
        for record in records:
            shared = {key: record[key] for key in (*_UNCERTAINTY, *_SELECTIVE) if key in record}
            answers.append([{"label": top["label"], "score": top["probability"], **shared} for top in record["top_k"]])
        return answers if isinstance(inputs, list) else answers[0]


def _to_image(value: Any) -> Image.Image:
    """A PIL image from a PIL image, encoded image bytes or a base64 string."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"'inputs' string is not valid base64 ({err})") from err
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as image:
                return image.copy()
        except UnidentifiedImageError as err:
            raise ValueError(f"'inputs' bytes are not an image PIL can read ({len(value)} bytes)") from err
    raise TypeError(f"'inputs' must be a PIL image, image bytes or a base64 string, got {type(value).__name__}")
