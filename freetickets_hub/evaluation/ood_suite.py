"""An out-of-distribution suite: far-OOD images made from nothing, shifted copies of the test images, held-out classes.

Three kinds of OOD set, each a source name for ``freetickets evaluate --ood-dataset``:

- **far**: another dataset (``sklearn:digits``, any ``datasets`` source), or images made from nothing
  but the model's input shape: ``synthetic:gaussian`` / ``synthetic:uniform`` noise, ``synthetic:constant``.
- **shifted**: the evaluation split's own images, ``shift:invert``-ed, ``shift:rot90``-rotated, or
  corrupted at severity 5 (``shift:contrast``; ``shift:contrast@3`` for another severity).
- **near**: ``held-out``, the evaluation split's images of the classes the model was not trained on
  (recipe key ``exclude_classes``); the in-distribution split keeps the model's classes.

``suite`` expands to ``sklearn:digits``, every ``synthetic:*``, every ``shift:*`` and, when the
evaluation dataset has classes the model does not know, ``held-out``. Generated sets are seeded
per set with ``np.random.default_rng``, so they do not depend on batching, processes or order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from freetickets_hub.data import EvalSplit
from freetickets_hub.errors import DatasetError

from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionTransform

__all__ = [
    "HELD_OUT",
    "KINDS",
    "SHIFTS",
    "SUITE",
    "SUITE_KINDS",
    "SYNTHETIC",
    "build_ood_splits",
    "expand_ood_sources",
    "ood_kind",
    "parse_shift",
    "shifted_images",
    "shifted_split",
    "split_held_out",
    "synthetic_images",
    "synthetic_split",
]

SYNTHETIC = ("gaussian", "uniform", "constant")  # far-OOD, made from nothing but the input shape
SHIFTS = ("invert", "rot90", *sorted(CORRUPTIONS))  # shifted copies of in-distribution images
KINDS = ("far", "shifted", "near")  # in the order reports list them
SUITE_KINDS = set(KINDS)
SHIFT_SEVERITY = 5  # severity of a corruption named without ``@<severity>``
SYNTHETIC_PREFIX, SHIFT_PREFIX = "synthetic:", "shift:"
HELD_OUT = "held-out"  # the evaluation dataset's classes that the model does not know
SUITE = "suite"  # every set above that applies


def synthetic_images(name: str, count: int, shape: tuple[int, int, int], *, seed: int = 0) -> torch.Tensor:
    """``count`` generated uint8 images ``(count, C, H, W)`` of kind ``name`` (one of ``SYNTHETIC``).

    ``gaussian``: every pixel N(0.5, 0.25²) in [0, 1] units, scaled by 255, rounded and clipped;
    ``uniform``: every pixel uniform over 0..255; ``constant``: one level per image, uniform over 0..255.

    Example:
        >>> synthetic_images("constant", 2, (1, 4, 4)).flatten(1).unique(dim=1).shape  # one level per image
        torch.Size([2, 1])
    """
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic set {name!r}; choose from {list(SYNTHETIC)}")
    if count < 1:
        raise ValueError(f"a synthetic set needs at least 1 image, got {count}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    size = (count, *shape)
    if name == "gaussian":
        pixels = np.clip(np.round(rng.normal(0.5, 0.25, size) * 255.0), 0, 255).astype(np.uint8)
    elif name == "uniform":
        pixels = rng.integers(0, 256, size, dtype=np.uint8)
    else:
        levels = rng.integers(0, 256, count, dtype=np.uint8)
        pixels = np.broadcast_to(levels.reshape(count, 1, 1, 1), size).copy()
    return torch.from_numpy(pixels)


def shifted_images(name: str, images: torch.Tensor, *, seed: int = 0, severity: int = SHIFT_SEVERITY) -> torch.Tensor:
    """Shifted copies of uint8 ``images`` ``(N, C, H, W)``: ``name`` is one of ``SHIFTS``.

    ``invert`` is ``255 - x``; ``rot90`` turns each image a quarter (``torch.rot90`` over H, W; square
    images only); a corruption name applies ``CorruptionTransform(name, severity, seed)`` to image ``i``
    with index ``i``, as ``evaluate``'s corruption benchmark does. ``severity`` is for corruptions only.

    Example:
        >>> shifted_images("invert", torch.zeros(1, 1, 2, 2, dtype=torch.uint8)).unique().tolist()
        [255]
    """
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose from {list(SHIFTS)}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if name in ("invert", "rot90") and severity != SHIFT_SEVERITY:
        raise ValueError(f"shift {name!r} has no severity (only corruptions do), got severity {severity}")
    if name == "invert":
        return 255 - images
    if name == "rot90":
        height, width = images.shape[-2:]
        if height != width:
            raise ValueError(f"shift 'rot90' needs square images, got {height}x{width}")
        return torch.rot90(images, 1, dims=(2, 3)).contiguous()
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    transform = CorruptionTransform(name, severity, seed)
    return torch.stack([transform(image, index) for index, image in enumerate(images)]) if len(images) else images


def ood_kind(name: str) -> str:
    """The kind of the OOD source ``name``: ``"shifted"`` for ``shift:*``, ``"near"`` for ``held-out``, else ``"far"``.

    Any dataset source other than the suite's own names counts as far-OOD (a different dataset).
    """
    if name.startswith(SHIFT_PREFIX):
        return "shifted"
    if name == HELD_OUT:
        return "near"
    return "far"


def parse_shift(source: str) -> tuple[str, int]:
    """``"shift:contrast@3"`` -> ``("contrast", 3)``; the severity defaults to 5."""
    body = source.removeprefix(SHIFT_PREFIX)
    name, at, level = body.partition("@")
    if name not in SHIFTS:
        raise DatasetError(f"unknown OOD source {source!r}; shifts are {[SHIFT_PREFIX + s for s in SHIFTS]}")
    if not at:
        return name, SHIFT_SEVERITY
    if name not in CORRUPTIONS:
        raise DatasetError(f"OOD source {source!r}: only corruptions take a severity, {name!r} does not")
    if not level.isdigit() or int(level) not in SEVERITIES:
        raise DatasetError(f"OOD source {source!r}: severity must be one of {SEVERITIES}, got {level!r}")
    return name, int(level)


def expand_ood_sources(names: Sequence[str], *, has_unknown_classes: bool) -> list[str]:
    """The OOD sources asked for, with ``suite`` expanded and repeats dropped (first one kept).

    Args:
        names: ``--ood-dataset`` values: dataset sources and the suite's names.
        has_unknown_classes: whether the evaluation dataset has classes the model does not know
            (``suite`` then includes ``held-out``).

    Raises:
        DatasetError: an unknown ``synthetic:`` or ``shift:`` name, or a bad severity.
    """
    expanded: list[str] = []
    for name in names:
        if name == SUITE:
            expanded += ["sklearn:digits", *(SYNTHETIC_PREFIX + s for s in SYNTHETIC)]
            expanded += [SHIFT_PREFIX + s for s in SHIFTS]
            expanded += [HELD_OUT] if has_unknown_classes else []
            continue
        if name.startswith(SYNTHETIC_PREFIX) and name.removeprefix(SYNTHETIC_PREFIX) not in SYNTHETIC:
            raise DatasetError(
                f"unknown OOD source {name!r}; synthetic sets are {[SYNTHETIC_PREFIX + s for s in SYNTHETIC]}"
            )
        if name.startswith(SHIFT_PREFIX):
            parse_shift(name)
        expanded.append(name)
    return list(dict.fromkeys(expanded))


def synthetic_split(source: str, data: EvalSplit, *, seed: int = 0) -> EvalSplit:
    """The ``synthetic:<name>`` set: as many images as ``data``, at its image shape."""
    name = source.removeprefix(SYNTHETIC_PREFIX)
    channels, height, width = data.images.shape[1:]
    images = synthetic_images(name, len(data), (channels, height, width), seed=seed)
    return EvalSplit(source, "generated", images, None)


def shifted_split(source: str, data: EvalSplit, *, seed: int = 0) -> EvalSplit:
    """The ``shift:<name>[@<severity>]`` set: ``data``'s own images, shifted."""
    name, severity = parse_shift(source)
    return EvalSplit(source, data.split, shifted_images(name, data.images, seed=seed, severity=severity), None)


def split_held_out(data: EvalSplit) -> tuple[EvalSplit, EvalSplit]:
    """``data`` loaded with ``keep_unknown_classes=True`` -> (the model's classes, the ``held-out`` set).

    Raises:
        DatasetError: ``data`` has no classes the model does not know, or no images of either kind.
    """
    if data.labels is None or not data.unknown_classes:
        raise DatasetError(
            f"OOD source {HELD_OUT!r} needs an evaluation dataset with classes the model was not trained on; "
            f"{data.source} has only the model's classes"
        )
    unknown = data.labels < 0
    if unknown.all() or not unknown.any():
        raise DatasetError(
            f"OOD source {HELD_OUT!r}: {data.description} has "
            f"{'only' if unknown.all() else 'no'} images of the classes {list(data.unknown_classes)} "
            "that the model does not know; both kinds are needed"
        )
    inside = EvalSplit(data.source, data.split, data.images[~unknown], data.labels[~unknown])
    held_out = EvalSplit(HELD_OUT, data.split, data.images[unknown], None, data.unknown_classes)
    return inside, held_out


def build_ood_splits(
    names: Sequence[str], data: EvalSplit, *, load: Callable[[str], EvalSplit], seed: int = 0
) -> tuple[EvalSplit, list[EvalSplit]]:
    """The in-distribution split and the OOD sets that ``names`` ask for, in their order.

    Args:
        names: ``--ood-dataset`` values (``suite`` is expanded).
        data: the labelled evaluation split; load it with ``keep_unknown_classes=True`` when ``names``
            hold ``held-out`` or ``suite``, so that the classes the model does not know become the
            ``held-out`` set (and leave the returned in-distribution split).
        load: loads a dataset source that is not one of the suite's own names (``sklearn:digits``, a Hub id...).
        seed: seed of the generated and corrupted sets.

    Raises:
        DatasetError: a bad name, or ``held-out`` without classes to hold out.
    """
    sources = expand_ood_sources(names, has_unknown_classes=bool(data.unknown_classes))
    held_out = None
    if data.unknown_classes or HELD_OUT in sources:
        data, held_out = split_held_out(data)
    splits = []
    for source in sources:
        if source == HELD_OUT:
            assert held_out is not None  # split_held_out raised otherwise
            splits.append(held_out)
        elif source.startswith(SYNTHETIC_PREFIX):
            splits.append(synthetic_split(source, data, seed=seed))
        elif source.startswith(SHIFT_PREFIX):
            splits.append(shifted_split(source, data, seed=seed))
        else:
            splits.append(load(source))
    return data, splits
