"""Checks an exported graph must pass before it is kept: the ONNX checker, its interface, and agreement
of ONNX Runtime with PyTorch on images of several batch sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image, ImageDraw, ImageFilter

from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import ImageInput, preprocess
from freetickets_hub.errors import ExportError
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES

__all__ = ["GATED_OUTPUTS", "check_interface", "check_pixels", "compare_with_torch", "synthetic_images"]

# outputs held to the tolerance; `logits` (log-probabilities, whose absolute error grows as p -> 0) is
# covered through `probs`, and `disagreement` is discrete (a member's near-tie may flip): both reported only
GATED_OUTPUTS = ("probs", "member_probs", "entropy", "expected_entropy", "mutual_information")


def check_interface(path: str | Path) -> None:
    """Run ``onnx.checker`` and check the input (``pixel_values``, dynamic batch) and the output names.

    Raises:
        ExportError: naming what is wrong.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path, so external data is checked too
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected {path}: {err}") from err
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [value.name for value in graph.input]
    if inputs != ["pixel_values"]:
        raise ExportError(f"{path}: expected the single input 'pixel_values', got {inputs}")
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param or batch.HasField("dim_value"):
        raise ExportError(f"{path}: the batch axis of 'pixel_values' is fixed to {batch.dim_value}, not dynamic")
    outputs = tuple(value.name for value in graph.output)
    if outputs != OUTPUT_NAMES:
        raise ExportError(f"{path}: expected the outputs {list(OUTPUT_NAMES)}, got {list(outputs)}")


def synthetic_images(pretrained_cfg: dict[str, Any], count: int, *, seed: int = 0) -> list[Image.Image]:
    """Photo-like test scenes: a lit gradient, a few filled shapes and strokes, blur and sensor noise.

    They are larger than the model's input and not square, so the check also runs the resize and
    centre crop of preprocessing; values cover the whole 0..255 range like real photographs.
    """
    channels, height, width = pretrained_cfg["input_size"]
    rng = np.random.default_rng(seed)
    size = (math.ceil(width * 1.5), math.ceil(height * 1.25))  # (W, H)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    images = []
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        light = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]  # (H, W, 1)
        base = rng.uniform(0, 255, 3) * (1 - light) + rng.uniform(0, 255, 3) * light
        image = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(2, 6)):
            box = sorted(rng.uniform(0, size[0], 2)), sorted(rng.uniform(0, size[1], 2))
            xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse(xy, fill=color)
            elif shape == 1:
                draw.rectangle(xy, fill=color)
            else:
                draw.line(xy, fill=color, width=int(rng.integers(1, 4)))
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")
        images.append(image.convert("L") if channels == 1 else image)
    return images


def check_pixels(images: Sequence[ImageInput] | None, pretrained_cfg: dict[str, Any], count: int) -> np.ndarray:
    """``count`` preprocessed check images: ``images`` cycled when too few, or synthetic scenes."""
    if images is None:
        images = synthetic_images(pretrained_cfg, count)
    images = list(images)
    if not images:
        raise ValueError("no check images given")
    return preprocess([images[i % len(images)] for i in range(count)], pretrained_cfg)


def compare_with_torch(
    model: EnsembleModel, engine: OnnxEnsemble, pixels: np.ndarray, batch_sizes: Sequence[int]
) -> dict[str, float]:
    """Largest absolute difference of each output between ``engine`` and ``model`` over ``batch_sizes``.

    The batch of size ``b`` is ``pixels[:b]``.

    Raises:
        ExportError: an output of the graph has a different shape than PyTorch's.
    """
    device = next(model.parameters()).device
    diffs = dict.fromkeys(OUTPUT_NAMES, 0.0)
    was_training = model.training
    model.eval()
    try:
        for batch_size in batch_sizes:
            batch = pixels[:batch_size]
            with torch.inference_mode():
                reference = model(torch.from_numpy(batch).to(device))
            outputs = engine(batch)
            for name in OUTPUT_NAMES:
                expected = getattr(reference, name).float().cpu().numpy()
                if outputs[name].shape != expected.shape:
                    raise ExportError(
                        f"output {name!r} has shape {outputs[name].shape} in ONNX Runtime and {expected.shape} "
                        f"in PyTorch at batch size {batch_size}"
                    )
                diffs[name] = max(diffs[name], float(np.abs(outputs[name] - expected).max()))
    finally:
        model.train(was_training)
    return diffs
