"""The bit-mask codec of sparse weights, in numpy: the one place that packs and unpacks a mask.

A sparse weight ``name`` of member ``i`` is stored as two tensors (DESIGN.md, "The Hub artifact"):
``members.{i}.{name}.mask`` — the row-major flattened boolean mask packed by ``numpy.packbits``
(big-endian bit order), and ``members.{i}.{name}.values`` — the 1-D values at the set positions in
row-major order. The compact ONNX graph (``export.compact``) stores its masked initializers the same
way. numpy only, so the torch-free engines (OpenVINO) decode with it too.
"""

from __future__ import annotations

import math

import numpy as np

from freetickets_hub.errors import ArtifactError

__all__ = ["pack_mask", "scatter_values", "unpack_mask"]


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean mask of any shape into uint8 bytes (row-major, big-endian bits)."""
    return np.packbits(np.asarray(mask, dtype=np.bool_).reshape(-1))


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...], *, name: str = "mask") -> np.ndarray:
    """Inverse of :func:`pack_mask`; checks the byte count and that padding bits are zero.

    Raises:
        ArtifactError: naming ``name``, for a wrong dtype or byte count, or set padding bits.
    """
    numel = math.prod(shape)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != math.ceil(numel / 8):
        raise ArtifactError(
            f"{name}: expected a 1-D uint8 tensor of {math.ceil(numel / 8)} bytes for a weight of shape "
            f"{tuple(shape)}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = np.unpackbits(packed)
    if bits[numel:].any():
        raise ArtifactError(f"{name}: padding bits after the last of {numel} positions are set")
    return bits[:numel].view(np.bool_).reshape(shape)  # a view: no copy


def scatter_values(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The dense tensor: ``values`` at the set positions of ``mask`` (row-major), zero elsewhere.

    ``values`` may hold more entries than set bits (a compact graph keeps one for an empty mask).
    """
    dense = np.zeros(mask.shape, values.dtype)
    dense[mask] = values[: int(np.count_nonzero(mask))]
    return dense
