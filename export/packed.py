"""``export onnx --packed``: M members at equal widths as ONE network whose layers are grouped by member.

Member m owns the m-th block of channels of every layer: a convolution with ``g`` groups becomes one
with ``M·g`` groups over the members' concatenated filters, a BatchNorm holds the members' scales and
statistics side by side, and each linear layer is a batched matrix product. The input is repeated M
times along its channels. This is how Packed-Ensembles (Laurent et al., ICLR 2023) run their members:
a few wide grouped kernels instead of M narrow branches. Masked weights stay zero where they were.

Only what it can group may hold tensors (convolutions, BatchNorm and linear layers, with their usual
weights and statistics), and the packed network is checked against the members before it is used:
an architecture whose forward mixes channels some other way is refused, never exported wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from freetickets_hub.errors import ExportError
from freetickets_hub.model.widths import module_widths

__all__ = ["PackedLinear", "PackedMembers"]

_CHECK_TOLERANCE = 1e-4  # max |packed - members| logits, relative to the logits' scale, float32


class PackedLinear(nn.Module):
    """M linear layers on ``(..., M·in)`` features, member-major: ``(..., M·out)``."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in linears]))  # (M, out, in)
        biases = [layer.bias for layer in linears]
        self.bias = None if biases[0] is None else nn.Parameter(torch.stack([b.detach() for b in biases]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members, _, features = self.weight.shape
        y = torch.einsum("...mi,moi->...mo", x.unflatten(-1, (members, features)), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.flatten(-2)


class PackedMembers(nn.Module):
    """The members as one grouped network: ``(B, C, H, W)`` -> member logits ``(M, B, K)``.

    Args:
        members: M networks of one architecture at the same widths (left unchanged).
        input_size: ``(C, H, W)`` of one input, for the check against the members.

    Raises:
        ExportError: the members' widths differ (the first differing layer is named), a layer holds
            weights that cannot be grouped, or the packed network does not reproduce the members.
    """

    def __init__(self, members: Sequence[nn.Module], input_size: Sequence[int]) -> None:
        super().__init__()
        self.num_members = len(members)
        _check_widths(members)
        self.network = _pack(members)
        _check_against(self, members, input_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.network(pixel_values.repeat(1, self.num_members, 1, 1))  # (B, M·K)
        return logits.unflatten(1, (self.num_members, -1)).transpose(0, 1)


def _check_widths(members: Sequence[nn.Module]) -> None:
    first = module_widths(members[0])
    for index, member in enumerate(members[1:], start=1):
        widths = module_widths(member)
        for name, width in first.items():
            if widths.get(name) != width:
                raise ExportError(
                    f"--packed needs every member at the same widths: member {index} has {name} at "
                    f"{widths.get(name)}, member 0 at {width} (export without --packed: separate branches)"
                )


def _cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])


_GROUPED = {  # what packing knows how to group: the tensors each kind of layer may hold, no other
    nn.Conv2d: {"weight", "bias"},
    nn.modules.batchnorm._BatchNorm: {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    nn.Linear: {"weight", "bias"},
}


def _check_groupable(name: str, module: nn.Module) -> None:
    """Refuse a layer holding a tensor packing would not group (a scaled conv's gain, a frozen norm's stats)."""
    held = {key for key, _ in module.named_parameters(recurse=False)} | {
        k for k, _ in module.named_buffers(recurse=False)
    }
    allowed = next((keys for kind, keys in _GROUPED.items() if isinstance(module, kind)), set())
    if held - allowed:
        raise ExportError(
            f"--packed cannot group layer {name!r} ({type(module).__name__}, holding {sorted(held - allowed)}): only "
            "convolutions, BatchNorm and linear layers may hold weights (export without --packed: separate branches)"
        )


@torch.no_grad()
def _pack(members: Sequence[nn.Module]) -> nn.Module:
    count = len(members)
    packed = copy.deepcopy(members[0])
    by_name = [dict(member.named_modules()) for member in members]
    for name, module in list(packed.named_modules()):
        _check_groupable(name, module)
        group = [modules[name] for modules in by_name]
        if isinstance(module, nn.Conv2d):
            module.weight = nn.Parameter(_cat([m.weight for m in group]))
            if module.bias is not None:
                module.bias = nn.Parameter(_cat([m.bias for m in group]))
            module.in_channels, module.out_channels = module.in_channels * count, module.out_channels * count
            module.groups *= count
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for key in ("weight", "bias"):
                if getattr(module, key) is not None:
                    setattr(module, key, nn.Parameter(_cat([getattr(m, key) for m in group])))
            for key in ("running_mean", "running_var"):
                if getattr(module, key) is not None:
                    setattr(module, key, _cat([getattr(m, key) for m in group]))
            module.num_features *= count
        elif isinstance(module, nn.Linear):
            packed.set_submodule(name, PackedLinear(group))
    return packed


@torch.no_grad()
def _check_against(packed: PackedMembers, members: Sequence[nn.Module], input_size: Sequence[int]) -> None:
    training = [member.training for member in members]
    for member in members:
        member.eval()
    packed.eval()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # in full float32 on a GPU too: TF32 kernels differ between grouped and plain convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
            x = x.to(next(packed.parameters()).device)
            want = torch.stack([member(x) for member in members]).float()
            got = packed(x).float()
    except RuntimeError as err:  # a forward that reads channel counts the packed layers no longer have
        raise ExportError(f"--packed cannot run this architecture as one grouped network: {err}") from err
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        for member, mode in zip(members, training, strict=True):
            member.train(mode)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=_CHECK_TOLERANCE * (1 + want.abs().max())):
        difference = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise ExportError(
            f"--packed does not reproduce the members of this architecture (max |diff| {difference}): "
            "its forward mixes channels across what packing groups; export without --packed"
        )
