"""``model.safetensors`` of an ensemble: every member's tensors, sparse weights as mask + values.

Dense tensors are stored as ``members.{i}.{name}``; a masked weight as ``members.{i}.{name}.mask``
(the bit-packed mask of :mod:`.masks`) plus ``members.{i}.{name}.values`` (DESIGN.md, "The Hub
artifact"). Functions only, the model never sees a file: ``EnsembleModel``'s persistence hooks call them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from freetickets_hub.artifact.files import atomic_path
from freetickets_hub.artifact.masks import pack_mask, unpack_mask
from freetickets_hub.artifact.names import LIBRARY_NAME
from freetickets_hub.errors import ArtifactError

__all__ = [
    "VALUES_DTYPES",
    "decode_member",
    "decode_members",
    "encode_member",
    "encode_members",
    "member_prefix",
    "read_weights",
    "stored_values_dtype",
    "write_weights",
]

VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in VALUES_DTYPES.items()}

State = dict[str, torch.Tensor]


def member_prefix(index: int) -> str:
    return f"members.{index}."


def encode_member(index: int, state_dict: State, masks: State, *, values_dtype: str = "float32") -> State:
    """Encode one member's ``state_dict``; weights named in ``masks`` are stored sparsely."""
    _check_values_dtype(values_dtype)
    prefix = member_prefix(index)
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise ArtifactError(f"member {index}: masks name tensors that are not in its state_dict: {unknown}")
    out: State = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if name in masks:
            mask = masks[name].to("cpu", torch.bool)
            if mask.shape != tensor.shape:
                raise ArtifactError(
                    f"member {index}: mask of {name} has shape {tuple(mask.shape)}, weight has {tuple(tensor.shape)}"
                )
            out[f"{prefix}{name}.mask"] = torch.from_numpy(pack_mask(mask.numpy()))
            out[f"{prefix}{name}.values"] = tensor.reshape(-1)[mask.reshape(-1)].to(VALUES_DTYPES[values_dtype])
        else:
            out[f"{prefix}{name}"] = tensor.contiguous()
    return out


def encode_members(states: Sequence[State], masks: Sequence[State], values_dtype: str) -> State:
    """The safetensors dict of every member: each conv/linear weight (>= 2-D float), sparse or left dense by
    the sparsity distribution, in ``values_dtype``; biases and norm tensors keep their dtype."""
    dtype = VALUES_DTYPES[_check_values_dtype(values_dtype)]
    tensors: State = {}
    for index, (state, member_masks) in enumerate(zip(states, masks, strict=True)):
        cast = {name: t.to(dtype) if t.is_floating_point() and t.dim() >= 2 else t for name, t in state.items()}
        tensors.update(encode_member(index, cast, member_masks, values_dtype=values_dtype))
    return tensors


def decode_member(index: int, tensors: State, template: State) -> tuple[State, State, set[str]]:
    """Rebuild member ``index``'s state_dict and masks from ``tensors``, strictly against ``template``.

    Returns:
        The state_dict (dtypes of ``template``), the masks of the weights stored sparsely, and the
        keys of ``tensors`` that were used (the caller rejects the rest).

    Raises:
        ArtifactError: naming the first missing or mis-shaped tensor or mask.
    """
    prefix = member_prefix(index)
    state: State = {}
    masks: State = {}
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
            mask = torch.from_numpy(_unpack(tensors[f"{key}.mask"], tuple(ref.shape), name=f"{key}.mask"))
            values = tensors[f"{key}.values"]
            count = int(mask.sum())
            if values.dim() != 1 or values.numel() != count:
                raise ArtifactError(
                    f"tensor {key + '.values'!r} has shape {tuple(values.shape)}, expected ({count},) "
                    "(one value per set mask bit)"
                )
            state[name] = torch.zeros(ref.shape, dtype=ref.dtype).masked_scatter_(mask, values.to(ref.dtype))
            masks[name] = mask
            used |= {f"{key}.mask", f"{key}.values"}
        elif f"{key}.mask" in tensors or f"{key}.values" in tensors:
            part = "values" if f"{key}.mask" in tensors else "mask"
            raise ArtifactError(f"tensor {key + '.' + part!r} is missing (its sparse counterpart is present)")
        else:
            raise ArtifactError(f"tensor {key!r} is missing from the checkpoint")
    return state, masks, used


def decode_members(
    tensors: State, templates: Sequence[State], *, source: Path, architecture: str
) -> list[tuple[State, State]]:
    """Every member's ``(state_dict, masks)``, strictly: a tensor no member uses is an error too.

    Raises:
        ArtifactError: a tensor is missing, mis-shaped, or not expected by ``templates``.
    """
    decoded, used = [], set()
    for index, template in enumerate(templates):
        state, masks, consumed = decode_member(index, tensors, template)
        decoded.append((state, masks))
        used |= consumed
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(
            f"{source} holds {len(extra)} tensor(s) this config does not expect, e.g. {extra[:5]} "
            f"(config has {len(templates)} member(s) of {architecture})"
        )
    return decoded


def read_weights(path: Path) -> State:
    """Every tensor of a safetensors file (never a pickle).

    Raises:
        ArtifactError: the file cannot be read (truncated or corrupt).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"cannot read {path}: {err} (is the file truncated or corrupt?)") from err


def write_weights(path: Path, tensors: State, values_dtype: str) -> None:
    """Write ``tensors`` atomically, with the metadata readers check (``format``, ``library``, ``values_dtype``).

    The same tensors give the same bytes: safetensors writes ``__metadata__`` in a random order
    (a Rust ``HashMap``, safetensors issue #584), so its keys are put in sorted order here.
    """
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "library": LIBRARY_NAME, "values_dtype": values_dtype})
        _sort_metadata(tmp)


_METADATA_START = b'{"__metadata__":'


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` object with sorted keys, in place (the same length)."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length)
        if not header.startswith(_METADATA_START):
            return
        text, start = header.decode("utf-8"), len(_METADATA_START)
        metadata, end = json.JSONDecoder().raw_decode(text, start)
        canonical = json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) == len(text[start:end].encode()):  # the same object in another order: the same bytes
            f.seek(8 + start)
            f.write(canonical)


def stored_values_dtype(tensors: State) -> str:
    """The dtype name the sparse values were stored in (float32 for an artifact without sparse weights)."""
    return next((_DTYPE_NAMES.get(t.dtype, "float32") for k, t in tensors.items() if k.endswith(".values")), "float32")


def _unpack(packed: torch.Tensor, shape: tuple[int, ...], *, name: str) -> np.ndarray:
    if packed.dtype != torch.uint8:  # checked here: a bf16 tensor has no numpy counterpart
        raise ArtifactError(
            f"{name}: expected a 1-D uint8 tensor of {math.ceil(math.prod(shape) / 8)} bytes for a weight of shape "
            f"{shape}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    return unpack_mask(packed.numpy(), shape, name=name)


def _check_values_dtype(values_dtype: str) -> str:
    if values_dtype not in VALUES_DTYPES:
        raise ValueError(f"values_dtype must be one of {sorted(VALUES_DTYPES)}, got {values_dtype!r}")
    return values_dtype
