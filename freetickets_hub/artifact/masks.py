"""Sparse weights on disk: bit-packed masks plus the values at the mask's set positions.

A sparse weight ``name`` of member ``i`` is stored as two tensors (DESIGN.md, "The Hub artifact"):
``members.{i}.{name}.mask`` — the row-major flattened boolean mask packed by ``numpy.packbits``
(big-endian bit order), and ``members.{i}.{name}.values`` — the 1-D values at the set positions in
row-major order. Every other tensor is stored densely as ``members.{i}.{name}``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from freetickets_hub.errors import ArtifactError

__all__ = ["VALUES_DTYPES", "decode_member", "encode_member", "member_prefix", "pack_mask", "unpack_mask"]

VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def member_prefix(index: int) -> str:
    return f"members.{index}."


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask of any shape into uint8 bytes (row-major, big-endian bits)."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...], *, name: str = "mask") -> torch.Tensor:
    """Inverse of :func:`pack_mask`; checks the byte count and that padding bits are zero."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise ArtifactError(
            f"{name}: expected a 1-D uint8 tensor of {math.ceil(numel / 8)} bytes for a weight of shape "
            f"{tuple(shape)}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = np.unpackbits(packed.numpy())
    if bits[numel:].any():
        raise ArtifactError(f"{name}: padding bits after the last of {numel} positions are set")
    return torch.from_numpy(bits[:numel].view(np.bool_)).reshape(shape)  # a view: no copy


def encode_member(
    index: int,
    state_dict: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    *,
    values_dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """Encode one member's ``state_dict``; weights named in ``masks`` are stored sparsely."""
    if values_dtype not in VALUES_DTYPES:
        raise ValueError(f"values_dtype must be one of {sorted(VALUES_DTYPES)}, got {values_dtype!r}")
    prefix = member_prefix(index)
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise ArtifactError(f"member {index}: masks name tensors that are not in its state_dict: {unknown}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if name in masks:
            mask = masks[name].to("cpu", torch.bool)
            if mask.shape != tensor.shape:
                raise ArtifactError(
                    f"member {index}: mask of {name} has shape {tuple(mask.shape)}, weight has {tuple(tensor.shape)}"
                )
            out[f"{prefix}{name}.mask"] = pack_mask(mask)
            out[f"{prefix}{name}.values"] = tensor.reshape(-1)[mask.reshape(-1)].to(VALUES_DTYPES[values_dtype])
        else:
            out[f"{prefix}{name}"] = tensor.contiguous()
    return out


def decode_member(
    index: int,
    tensors: dict[str, torch.Tensor],
    template: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """Rebuild member ``index``'s state_dict and masks from ``tensors``, strictly against ``template``.

    Returns:
        The state_dict (dtypes of ``template``), the masks of the weights stored sparsely, and the
        keys of ``tensors`` that were used (the caller rejects the rest).

    Raises:
        ArtifactError: naming the first missing or mis-shaped tensor or mask.
    """
    prefix = member_prefix(index)
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, ref in template.items():
        key = f"{prefix}{name}"
        if key in tensors:
            tensor = tensors[key]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise ArtifactError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
            state[name] = tensor.to(ref.dtype)
            used.add(key)
        elif f"{key}.mask" in tensors and f"{key}.values" in tensors:
            mask = unpack_mask(tensors[f"{key}.mask"], tuple(ref.shape), name=f"{key}.mask")
            values = tensors[f"{key}.values"]
            count = int(mask.sum())
            if values.dim() != 1 or values.numel() != count:
                raise ArtifactError(
                    f"tensor {key + '.values'!r} has shape {tuple(values.shape)}, expected ({count},) "
                    "(one value per set mask bit)"
                )
            dense = torch.zeros(ref.shape, dtype=ref.dtype).masked_scatter_(mask, values.to(ref.dtype))
            state[name] = dense
            masks[name] = mask
            used |= {f"{key}.mask", f"{key}.values"}
        elif f"{key}.mask" in tensors or f"{key}.values" in tensors:
            part = "values" if f"{key}.mask" in tensors else "mask"
            raise ArtifactError(f"tensor {key + '.' + part!r} is missing (its sparse counterpart is present)")
        else:
            raise ArtifactError(f"tensor {key!r} is missing from the checkpoint")
    return state, masks, used
