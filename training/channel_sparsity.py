"""Channel-level sparsity (Chase, Yin et al., NeurIPS 2023): score channels, schedule, and remove them physically.

Unstructured DST (``sparsity.py``) keeps every layer at full width, so a member costs a dense
model's wall time. Here whole channels go: each *channel group* (the output channels of one conv
together with every layer coupled to them: its norm, the next layers' inputs, and, across a
residual add, all convs writing into the same stream) is scored by UMM, the mean magnitude of its
filters with zeros included; a cubic schedule sets how many channels remain; and the lowest-scored
are sliced out of every coupled layer by Torch-Pruning's DependencyGraph (PyPI ``torch-pruning``),
which traces the model and finds the coupling (residual adds, norms, depthwise convs).

Every index is recorded in a :class:`ChannelGroup`, so what Torch-Pruning did to the weights can be
done to any tensor shaped like them (the DST masks, optimizer state): :func:`slice_tensors`. The
slim member's layout is its widths record (``freetickets_hub.model.widths``), from which a loader
rebuilds it without this module.

    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=10).eval()
    >>> graph = ChannelGraph(model, (3, 32, 32))
    >>> scores = umm_scores(model, graph.groups)
    >>> counts = kept_counts(graph.groups, scores, 0.5, full=module_widths(model), allocation="uniform")
    >>> slim = graph.remove(choose_channels(scores, counts))
    >>> model(torch.zeros(1, 3, 32, 32)).shape, slim.widths["fc"]
    (torch.Size([1, 10]), [10, 256])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from freetickets_hub.model.widths import Widths, module_widths

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelLayer",
    "SlimMember",
    "ablation_scores",
    "channel_sparsity_at",
    "choose_channels",
    "kept_counts",
    "narrow_widths",
    "removed_positions",
    "slice_tensors",
    "umm_scores",
    "zero_channels",
]

_SLICED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)  # what Torch-Pruning slices here and timm's rebuilder rebuilds


@dataclass(frozen=True)
class ChannelLayer:
    """One layer losing a group's channels: along its outputs (``dim="out"``) or its inputs (``"in"``).

    ``positions[c]`` is the layer's own index of the group's channel ``c`` (they differ after a concat).
    """

    name: str
    dim: str
    positions: tuple[int, ...]
    scored: bool  # a conv or linear producing the channels: its filters' magnitudes score them


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that only go together: ``root``'s output channels and every layer coupled to them."""

    root: str
    width: int
    layers: tuple[ChannelLayer, ...]


@dataclass
class SlimMember:
    """The outcome of a removal: the member's masks at their new shapes and its widths record."""

    masks: dict[str, torch.Tensor]
    widths: Widths


def channel_sparsity_at(step: int, *, target: float, start: int, end: int) -> float:
    """Share of channels removed at ``step``: 0 until ``start``, ``target`` from ``end``, cubic between.

    The gradual-pruning curve Chase uses (Zhu & Gupta 2017): fast early, when channels are cheap to
    lose, and flat towards ``end``: ``target * (1 - (1 - progress)^3)``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target channel sparsity must be in [0, 1), got {target}")
    if end <= start:
        raise ValueError(f"the channel schedule must end after it starts, got start={start}, end={end}")
    progress = min(1.0, max(0.0, (step - start) / (end - start)))
    return target * (1.0 - (1.0 - progress) ** 3)


class ChannelGraph:
    """The channel groups of ``model``, found by tracing it once with Torch-Pruning's DependencyGraph.

    Args:
        model: a timm (or any) model; traced in eval mode so BatchNorm statistics stay as they are.
        input_size: ``(C, H, W)`` of one example input.
        ignored: modules whose output channels are never removed; the classifier always is.

    Raises:
        ValueError: the model has a grouped convolution that is not depthwise (Torch-Pruning slices
            a grouped conv's inputs as if every group lost the same channels, which it does not here).
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, ...], *, ignored: tuple[nn.Module, ...] = ()) -> None:
        grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
        if grouped:
            raise ValueError(f"grouped convolutions cannot be slimmed yet: {grouped}")
        self.model = model
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():  # DependencyGraph traces autograd's graph
                weight = next(model.parameters())  # trace on the model's device, in its dtype
                example = torch.zeros(1, *input_size, device=weight.device, dtype=weight.dtype)
                self._graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
        finally:
            model.train(was_training)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        ignore = [m for m in (classifier, *ignored) if isinstance(m, nn.Module)]
        names = {module: name for name, module in model.named_modules()}
        self.groups = [
            self._describe(group, names)
            for group in self._graph.get_all_groups(ignored_layers=ignore, root_module_types=(nn.Conv2d,))
        ]
        self._spent = False

    def _describe(self, group: tp.dependency.Group, names: dict[nn.Module, str]) -> ChannelGroup:
        root = group[0].dep.target.module
        layers = []
        for item in group.items:
            module = item.dep.target.module
            if module not in names:
                continue  # the traced adds, reshapes and other operators hold no tensors
            if not isinstance(module, _SLICED):
                kind = type(module).__name__
                raise ValueError(f"{names[module]} ({kind}) is coupled to channels but cannot be sliced")
            # a depthwise conv and a norm lose the channel along their only channel axis
            along_outputs = self._graph.is_out_channel_pruning_fn(item.dep.handler)
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            out = depthwise or isinstance(module, nn.BatchNorm2d) or along_outputs
            order = sorted(range(len(item.idxs)), key=lambda j: item.root_idxs[j])
            layers.append(
                ChannelLayer(
                    name=names[module],
                    dim="out" if out else "in",
                    positions=tuple(int(item.idxs[j]) for j in order),
                    scored=out and not isinstance(module, nn.BatchNorm2d),
                )
            )
        width = root.out_channels
        assert all(len(layer.positions) == width for layer in layers), "a coupled layer sees another channel count"
        return ChannelGroup(root=names[root], width=width, layers=tuple(layers))

    def remove(self, kept: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None) -> SlimMember:
        """Slice every channel not in ``kept[root]`` out of the model, in place (its parameters are replaced).

        Args:
            kept: per group root, the channel indices to keep (:func:`choose_channels`); a group not
                named keeps all of its channels.
            masks: the member's DST masks (``name.weight`` -> bool, full shapes), sliced alike.

        Returns:
            The sliced masks and the slim model's widths record. The graph is spent afterwards: the
            model's shapes changed, so trace it again for the next removal.
        """
        if self._spent:
            raise RuntimeError("this ChannelGraph already removed channels: build a new one on the slim model")
        self._spent = True
        removal = removed_positions(self.groups, kept)
        modules = dict(self.model.named_modules())
        for group in self.groups:
            keep = set(int(c) for c in kept.get(group.root, range(group.width)))
            drop = [c for c in range(group.width) if c not in keep]
            if drop:
                root = modules[group.root]
                self._graph.get_pruning_group(root, tp.prune_conv_out_channels, drop).prune()
        return SlimMember(masks=slice_tensors(masks or {}, removal), widths=module_widths(self.model))


def umm_scores(
    model: nn.Module, groups: list[ChannelGroup], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """UMM score of every channel: the mean |w| of its filter, zeros included (Chase's criterion).

    A channel written by several convs (a residual stream) gets the mean of their filters' scores.
    Weights are read through ``masks`` when given (entries outside a mask count as zero).
    """
    masks = masks or {}

    def magnitude(name: str, weight: torch.Tensor) -> torch.Tensor:
        mask = masks.get(f"{name}.weight")
        weight = weight.detach() if mask is None else weight.detach() * mask.to(weight.device)
        return weight.abs().float().reshape(weight.shape[0], -1).mean(1)

    return _per_channel(model, groups, magnitude)


def ablation_scores(
    model: nn.Module, groups: list[ChannelGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Share of each channel's filter weights the DST mask keeps active (SRigL's salient-weight count).

    A channel whose filters the sparse engine has mostly emptied is the first to go (SRigL ablates a
    neuron with too few salient weights); a layer without a mask is dense, so its channels score 1.
    """

    def active(name: str, weight: torch.Tensor) -> torch.Tensor:
        mask = masks.get(f"{name}.weight")
        return torch.ones(weight.shape[0]) if mask is None else mask.reshape(mask.shape[0], -1).float().mean(1)

    return _per_channel(model, groups, active)


def _per_channel(
    model: nn.Module, groups: list[ChannelGroup], per_filter: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per group, ``per_filter(layer name, weight)`` of every producing layer, averaged over them."""
    modules = dict(model.named_modules())
    scores = {}
    for group in groups:
        total = torch.zeros(group.width)
        producers = [layer for layer in group.layers if layer.scored]
        for layer in producers:
            total += per_filter(layer.name, modules[layer.name].weight).cpu()[list(layer.positions)]
        scores[group.root] = total / max(1, len(producers))
    return scores


def kept_counts(
    groups: list[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    full: Mapping[str, list[int]],
    floor: float = 0.25,
    multiple: int = 16,
    allocation: str = "global",
) -> dict[str, int]:
    """How many channels each group keeps so that about ``sparsity`` of all channels are removed.

    ``global`` (Chase): one score threshold over every group's channels; a group falling below its
    floor keeps the floor and the others share the rest. ``uniform``: every group keeps
    ``1 - sparsity`` of its channels. Counts are then rounded to a multiple of ``multiple`` (ONNX
    Runtime's blocked conv layout needs it: unaligned widths cost more than they save), never above
    the group's current width and never below ``max(floor * full width, multiple)``; a group whose
    full width is at most ``multiple`` keeps its width.

    Args:
        groups: the channel groups of the model now.
        scores: per group root, a score per channel (:func:`umm_scores`).
        sparsity: target share of the full model's channels removed (:func:`channel_sparsity_at`).
        full: the full-width model's widths record: the floor and the target count from it.
        floor: per-layer floor, as a share of the group's full width.
        multiple: kept counts are multiples of this.
        allocation: ``"global"`` or ``"uniform"``.
    """
    if not 0.0 <= sparsity < 1.0 or not 0.0 < floor <= 1.0 or multiple < 1:
        raise ValueError(f"need 0 <= sparsity < 1, 0 < floor <= 1, multiple >= 1; got {sparsity}, {floor}, {multiple}")
    full_width = {g.root: full[g.root][0] for g in groups}
    minimum = {g.root: min(g.width, math.ceil(floor * full_width[g.root])) for g in groups}
    if allocation == "uniform":
        raw = {g.root: (1.0 - sparsity) * full_width[g.root] for g in groups}
    elif allocation == "global":
        raw = _global_counts(groups, scores, round((1.0 - sparsity) * sum(full_width.values())), minimum)
    else:
        raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")
    counts = {}
    for g in groups:
        if full_width[g.root] <= multiple:
            counts[g.root] = g.width
            continue
        lowest = max(multiple, multiple * math.ceil(minimum[g.root] / multiple))
        counts[g.root] = min(g.width, max(lowest, multiple * round(raw[g.root] / multiple)))
    return counts


def _global_counts(
    groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], budget: int, minimum: Mapping[str, int]
) -> dict[str, float]:
    """Channels per group above one global threshold, with groups at their floor held there."""
    fixed: dict[str, float] = {}
    while True:
        free = [g for g in groups if g.root not in fixed]
        left = max(0, budget - int(sum(fixed.values())))
        ranked = torch.cat([scores[g.root] for g in free]) if free else torch.zeros(0)
        owner = torch.cat([torch.full((g.width,), i) for i, g in enumerate(free)]) if free else torch.zeros(0)
        top = owner[torch.argsort(ranked, descending=True, stable=True)[:left]]
        counts = {g.root: float((top == i).sum()) for i, g in enumerate(free)}
        below = {root: float(minimum[root]) for root, count in counts.items() if count < minimum[root]}
        if not below:
            return {**fixed, **counts}
        fixed.update(below)


def narrow_widths(model: nn.Module, input_size: tuple[int, ...], sparsity: float, multiple: int = 16) -> Widths:
    """The widths record of ``model`` with ``sparsity`` of every channel group's channels removed.

    The layout of a narrow dense member (Packed-Ensembles with gamma=1): each group keeps
    ``1 - sparsity`` of its channels (``uniform`` allocation, no floor below that), rounded to
    ``multiple``. ``model`` itself is left as it is; build the member with
    :func:`~freetickets_hub.model.widths.create_slim_model` for a fresh init at those widths.
    """
    reference = copy.deepcopy(model)
    graph = ChannelGraph(reference, input_size)
    scores = {group.root: torch.zeros(group.width) for group in graph.groups}  # which channels go is moot
    full = module_widths(reference)
    counts = kept_counts(
        graph.groups, scores, sparsity, full=full, floor=1.0 - sparsity, multiple=multiple, allocation="uniform"
    )
    return graph.remove(choose_channels(scores, counts)).widths


def choose_channels(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per group, the ``counts[root]`` channels of highest score (ties to the lower index), sorted."""
    kept = {}
    for root, count in counts.items():
        order = torch.argsort(scores[root], descending=True, stable=True)
        kept[root] = order[:count].sort().values
    return kept


def removed_positions(groups: list[ChannelGroup], kept: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], list[int]]:
    """For every ``(layer name, "out" | "in")`` that loses channels, the layer's own positions removed."""
    removal: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        keep = set(int(c) for c in kept.get(group.root, range(group.width)))
        drop = [c for c in range(group.width) if c not in keep]
        for layer in group.layers if drop else ():
            removal.setdefault((layer.name, layer.dim), set()).update(layer.positions[c] for c in drop)
    return {key: sorted(positions) for key, positions in removal.items()}


def slice_tensors(
    tensors: Mapping[str, torch.Tensor], removal: Mapping[tuple[str, str], list[int]]
) -> dict[str, torch.Tensor]:
    """``tensors`` named as in a ``state_dict`` (weights, biases, norm statistics, masks) with the removed
    positions sliced out, exactly as the physical removal slices the parameters."""
    out = {}
    for key, tensor in tensors.items():
        layer, _, _ = key.rpartition(".")
        for (name, dim), positions in removal.items():
            if name != layer or tensor.dim() == 0:
                continue
            if dim == "in" and tensor.dim() == 1:
                continue  # a bias follows the outputs only
            axis = 0 if dim == "out" else 1
            keep = torch.ones(tensor.shape[axis], dtype=torch.bool, device=tensor.device)
            keep[positions] = False
            tensor = tensor.index_select(axis, keep.nonzero().squeeze(1))
        out[key] = tensor
    return out


@torch.no_grad()
def zero_channels(model: nn.Module, removal: Mapping[tuple[str, str], list[int]]) -> None:
    """Zero, at full width, what :meth:`ChannelGraph.remove` would slice out: the masked reference model.

    A removed channel's filters, biases and norm scale/shift become 0 and every consumer's input
    weights from it too, so the channel contributes nothing: the model computes what the slim one does.
    """
    modules = dict(model.named_modules())
    for (name, dim), positions in removal.items():
        module, index = modules[name], torch.tensor(positions, dtype=torch.long)
        if dim == "in" and not isinstance(module, nn.BatchNorm2d):
            module.weight[:, index] = 0
            continue
        module.weight[index] = 0
        if getattr(module, "bias", None) is not None:
            module.bias[index] = 0
