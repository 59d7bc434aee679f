"""Slim members: the widths record of a physically narrowed timm model, and rebuilding one from it.

A slim member (channel-level dynamic sparsity, ``training/channel_sparsity.py``) is its timm
architecture with fewer channels in some layers. Its *widths record* lists the channel counts of
every conv, linear and norm layer by module name, as JSON primitives:

    {"conv_stem": [16, 1], "stages.0.0.bn1": [16], "stages.0.0.conv1": [32, 16], ..., "fc": [10, 128]}

(conv: ``[out_channels, in_channels]``; linear: ``[out_features, in_features]``; norm:
``[num_features]``). :func:`create_slim_model` rebuilds the member's modules at those widths with
timm's own rebuilder (``timm.models.adapt_model_from_string``, the one behind timm's pruned
EfficientNets), so a loader can create the shapes first and then load the state_dict strictly.
It needs torch and timm only (no pruning library).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from timm.models import adapt_model_from_string
from torch import nn

from freetickets_hub.errors import ArtifactError

__all__ = ["Widths", "create_slim_model", "module_widths"]

Widths = dict[str, list[int]]  # module name -> [out, in] (conv, linear) or [features] (norm)

_NORMS = (nn.BatchNorm2d,)  # timm's BatchNormAct2d derives from it; what adapt_model_from_string rebuilds


def _layer_widths(module: nn.Module) -> list[int] | None:
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    if isinstance(module, _NORMS):
        return [module.num_features]
    return None


def module_widths(model: nn.Module) -> Widths:
    """The widths record of ``model``: channel counts of each conv, linear and norm layer, by module name."""
    return {name: widths for name, module in model.named_modules() if (widths := _layer_widths(module)) is not None}


def create_slim_model(architecture: str, widths: Mapping[str, list[int]], **kwargs: Any) -> nn.Module:
    """``timm.create_model(architecture, **kwargs)`` rebuilt at ``widths`` (freshly initialised weights).

    Args:
        architecture: the timm architecture name.
        widths: the member's widths record (:func:`module_widths` of the slim model).
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``, ``model_args``...).

    Raises:
        ArtifactError: naming the module when the record misses one of the architecture's layers,
            names a layer it does not have, has a width of the wrong form, or asks for something the
            rebuild cannot honour (a wider layer than the architecture, other input channels or
            classes, a grouped convolution that is not depthwise).
    """
    full = timm.create_model(architecture, pretrained=False, **kwargs)
    expected = module_widths(full)
    _check_record(expected, widths)
    modules = dict(full.named_modules())
    for name, wanted in widths.items():
        module = modules[name]
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.out_channels:
            raise ArtifactError(f"widths[{name!r}]: grouped convolutions (groups={module.groups}) cannot be slimmed")
        if isinstance(module, nn.Conv2d) and module.groups > 1 and wanted[0] != wanted[1]:
            raise ArtifactError(f"widths[{name!r}] = {list(wanted)}: a depthwise conv keeps in == out channels")
    # timm's spec gives each layer's weight shape; only the leading dims (out, in) are read
    spec = "***".join(f"{name}.weight:[{','.join(map(str, widths[name]))}]" for name in expected)
    slim = adapt_model_from_string(full, spec)
    built = module_widths(slim)
    wrong = sorted(name for name in expected if built[name] != list(widths[name]))
    if wrong:  # e.g. a classifier or stem width that timm's rebuilder keeps from the architecture
        name = wrong[0]
        raise ArtifactError(f"widths[{name!r}] = {list(widths[name])} cannot be built: the layer becomes {built[name]}")
    slim.train(full.training)
    return slim


def _check_record(expected: Widths, widths: Mapping[str, list[int]]) -> None:
    missing = sorted(set(expected) - set(widths))
    if missing:
        raise ArtifactError(f"widths record misses layer(s) {missing} of the architecture")
    unknown = sorted(set(widths) - set(expected))
    if unknown:
        raise ArtifactError(f"widths record names layer(s) {unknown} that the architecture does not have")
    for name, full in expected.items():
        wanted = widths[name]
        if (
            not isinstance(wanted, list | tuple)
            or len(wanted) != len(full)
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in wanted)
        ):
            raise ArtifactError(f"widths[{name!r}] must be {len(full)} positive integer(s), got {wanted!r}")
        if any(w > f for w, f in zip(wanted, full, strict=True)):
            raise ArtifactError(f"widths[{name!r}] = {list(wanted)} is wider than the architecture's {full}")
