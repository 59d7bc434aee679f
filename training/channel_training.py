"""``structure: channel``: Chase's channel removal inside a DST or EDST run, and the slim ticket it yields.

Training stays at full width: a removed channel is *masked*, not cut. Its filters, its consumers'
input weights and its norm's scale and shift are zeroed after every step, and the sparse engine
never regrows weights there (:meth:`~freetickets_hub.training.sparsity.SparseEngine.forbid`), so the
full-width model computes exactly what the slim one will. The ticket is then sliced physically
(:meth:`ChannelGraph.remove`, Torch-Pruning) and stored at its own widths. Masking rather than cutting
mid-run keeps the optimizer, DDP and the checkpoints at one set of shapes, as Chase's CIFAR code does
with its filter masks; the speed is claimed where it is measured, at inference.

Every ticket phase (a DST member's run, each EDST refinement) removes channels on the cubic schedule
from ``channel_start`` to ``channel_end`` of the phase, at every ``update_interval`` step and at the
schedule's last step. EDST's exploration removes none: it is shared by every ticket, and channels
removed there would be every ticket's. Instead each forced escape gives the next ticket its own
channels: every removed channel comes back with a fresh init (timm's, seeded by the run and the
phase), the engine regrows each layer to its own count among them, and the phase's schedule chooses
again on the new ticket's weights. A ticket that kept its siblings' channels would add no diversity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from freetickets_hub.model.widths import Widths, module_widths

from .channel_sparsity import (
    ChannelGraph,
    ablation_scores,
    channel_sparsity_at,
    choose_channels,
    kept_counts,
    removed_positions,
    umm_scores,
    zero_channels,
)
from .recipe import Recipe
from .sparsity import SparseEngine

__all__ = ["ChannelPruner", "SlimTicket"]

SlimTicket = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Widths]  # state, masks, widths


class ChannelPruner:
    """The channels one run keeps, the schedule that removes the rest, and the slicing of its tickets.

    Args:
        model: the run's full-width model (unwrapped); traced once, its groups hold for the whole run.
        engine: the run's sparse engine, which holds the removed channels' weights at zero.
        recipe: ``channel_sparsity``, ``channel_start/end``, ``channel_floor``, ``channel_multiple``,
            ``channel_criterion``, ``channel_allocation`` and ``update_interval``.
        input_size: ``(C, H, W)`` of one input.
    """

    def __init__(self, model: nn.Module, engine: SparseEngine, recipe: Recipe, input_size: tuple[int, ...]) -> None:
        self.engine, self.recipe, self.input_size = engine, recipe, input_size
        self.groups = ChannelGraph(model, input_size).groups
        self.full = module_widths(model)
        self.kept = {group.root: torch.arange(group.width) for group in self.groups}
        self.removal: dict[tuple[str, str], list[int]] = {}

    def removed(self) -> int:
        """Channels removed so far, over all groups."""
        return sum(group.width - len(self.kept[group.root]) for group in self.groups)

    def step(self, model: nn.Module, step: int, phase_steps: int) -> int:
        """After optimizer step ``step`` (from 1) of a ticket phase of ``phase_steps``: remove what the
        schedule asks for now. Returns the channels removed at this step (0 off the update steps)."""
        recipe = self.recipe
        start, end = round(recipe.channel_start * phase_steps), max(1, round(recipe.channel_end * phase_steps))
        if not start < step <= end or (step % recipe.update_interval and step != end):
            self._hold(model)
            return 0
        sparsity = channel_sparsity_at(step, target=recipe.channel_sparsity, start=start, end=end)
        scores = self._scores(model)
        counts = kept_counts(
            self.groups,
            scores,
            sparsity,
            full=self.full,
            floor=recipe.channel_floor,
            multiple=recipe.channel_multiple,
            allocation=recipe.channel_allocation,
        )
        counts = {root: min(count, len(self.kept[root])) for root, count in counts.items()}
        before = self.removed()
        if all(count == len(self.kept[root]) for root, count in counts.items()):
            self._hold(model)
            return 0
        for root, score in scores.items():  # a removed channel stays removed, whatever it scores
            gone = torch.ones(len(score), dtype=torch.bool)
            gone[self.kept[root]] = False
            score[gone] = -float("inf")
        self.set_kept(model, choose_channels(scores, counts))
        return self.removed() - before

    def set_kept(self, model: nn.Module, kept: Mapping[str, torch.Tensor]) -> None:
        """Keep exactly ``kept`` (per group root), masking every other channel: a schedule step or a resume."""
        self.kept = {root: kept[root].clone() for root in self.kept}
        self.removal = removed_positions(self.groups, self.kept)
        weights = self.engine.weights
        forbidden = {}
        for (layer, dim), positions in self.removal.items():
            name = f"{layer}.weight"
            if name not in weights or weights[name].dim() < 2:
                continue  # a norm: not maskable, zeroed below
            block = forbidden.setdefault(name, torch.zeros(weights[name].shape, dtype=torch.bool))
            if dim == "out":
                block[positions] = True
            else:
                block[:, positions] = True  # a layer may lose inputs and outputs both
        self.engine.forbid(forbidden)
        self._hold(model)

    def restore(self, model: nn.Module, create: Callable[[], nn.Module], generator: torch.Generator) -> int:
        """EDST's escape: every removed channel back, with ``create()``'s fresh init; returns weights regrown."""
        if not self.removal:
            return 0
        fresh = create().to(next(model.parameters()).device)
        state, fresh_state = model.state_dict(), fresh.state_dict()
        with torch.no_grad():
            for (layer, dim), positions in self.removal.items():
                index = torch.tensor(positions, dtype=torch.long, device=state[f"{layer}.weight"].device)
                for key in (f"{layer}.{k}" for k in ("weight", "bias", "running_mean", "running_var")):
                    if key not in state or key in self.engine.forbidden or (dim == "in" and state[key].dim() < 2):
                        continue  # a masked weight regrows through the engine, at its own count
                    axis = 1 if dim == "in" and state[key].dim() > 1 else 0
                    state[key].index_copy_(axis, index, fresh_state[key].index_select(axis, index))
        values = {name: fresh_state[name] for name in self.engine.forbidden}
        grown = self.engine.restore(values, generator)
        self.kept = {group.root: torch.arange(group.width) for group in self.groups}
        self.removal = {}
        return grown

    def slim(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> SlimTicket:
        """The ticket at its physical widths: a copy of ``model`` with the removed channels sliced out."""
        copied = copy.deepcopy(model).cpu()
        member = ChannelGraph(copied, self.input_size).remove(self.kept, {k: v.cpu() for k, v in masks.items()})
        state = {k: v.detach().clone() for k, v in copied.state_dict().items()}
        masks = {k: v for k, v in member.masks.items() if not bool(v.all())}  # a layer left whole is dense
        return state, masks, member.widths

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept channel indices per group root (saved with every checkpoint)."""
        return {root: kept.clone() for root, kept in self.kept.items()}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Resume: hold what the checkpoint had removed (after the engine's own state is loaded)."""
        if set(state) != set(self.kept):
            raise ValueError(f"channel groups differ: checkpoint {sorted(state)} vs model {sorted(self.kept)}")
        self.set_kept(model, {root: kept.long() for root, kept in state.items()})

    def _scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.recipe.channel_criterion == "ablation":
            return ablation_scores(model, self.groups, self.engine.masks)
        return umm_scores(model, self.groups, self.engine.masks)

    def _hold(self, model: nn.Module) -> None:
        """Zero what the masks do not hold: the removed channels' biases and norm scales and shifts."""
        if self.removal:
            zero_channels(model, self.removal)
