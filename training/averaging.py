"""Per-ticket weight averaging (SWA-style): a ticket is the mean of its phase's last iterates.

Over the last ``average_fraction`` of each ticket phase the masks are frozen (no prune/regrow, so
every averaged iterate has the ticket's mask and the mean keeps it), the weights after every
optimizer step are averaged with ``torch.optim.swa_utils.AveragedModel``, and the ticket is the
average with its BatchNorm statistics recomputed on the training split (``update_bn``, evaluation
preprocessing). Training continues from the last iterate: only the ticket is averaged.

With ``average_cycles`` C (Sup-tickets-style), the window's LR runs C cycles, each falling linearly
from ``average_cycle_lr`` (default: 10x the window's own LR) to the window's own LR, and only the
iterate at each cycle's end is averaged: C cheap tickets superposed into one, masks still frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

__all__ = ["CyclePosition", "TicketAverage", "cycle_position", "in_window"]


def _window_steps(phase_steps: int, fraction: float) -> int:
    return max(1, round(fraction * phase_steps))


def in_window(step_in_phase: int, phase_steps: int, fraction: float) -> bool:
    """Whether the phase's ``step_in_phase``-th optimizer step (from 1) falls in its averaging window."""
    return fraction > 0 and step_in_phase > phase_steps - _window_steps(phase_steps, fraction)


@dataclass(frozen=True)
class CyclePosition:
    """Where a step of the averaging window falls in its LR cycle (``average_cycles``)."""

    progress: float  # in (0, 1]: 1 at the cycle's last step
    last: bool  # the cycle ends with this step: its iterate is one of the averaged tickets


def cycle_position(step_in_phase: int, phase_steps: int, fraction: float, cycles: int) -> CyclePosition:
    """The window of ``in_window`` split into ``cycles`` nearly equal cycles (at least one step each).

    Sup-tickets (Yin et al., UAI 2022): each cycle's LR falls from high to low, and the iterate at its
    low end is a cheap ticket; the phase's ticket is their average.
    """
    window = _window_steps(phase_steps, fraction)
    cycles = min(cycles, window)
    k = step_in_phase - (phase_steps - window) - 1  # 0-based within the window
    index = k * cycles // window
    start, end = -(-index * window // cycles), -(-(index + 1) * window // cycles)
    return CyclePosition((k - start + 1) / (end - start), k == end - 1)


class TicketAverage:
    """The running mean of one phase's iterates (parameters only; buffers are recomputed)."""

    def __init__(self) -> None:
        self.average: AveragedModel | None = None

    @property
    def count(self) -> int:
        return 0 if self.average is None else int(self.average.n_averaged.item())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Add ``model``'s current parameters to the mean (the first call starts the window)."""
        if self.average is None:
            self.average = AveragedModel(copy.deepcopy(model).cpu(), device=torch.device("cpu"), use_buffers=False)
        self.average.update_parameters(model)

    def reset(self) -> None:
        self.average = None

    @contextmanager
    def applied(self, model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[None]:
        """Within the block ``model`` holds the average, its BatchNorm statistics recomputed on ``batches``;
        on exit its own weights and buffers come back."""
        assert self.average is not None, "no iterate averaged in this phase"
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for own, mean in zip(model.parameters(), self.average.module.parameters(), strict=True):
                own.copy_(mean)
        update_bn(batches, model)
        try:
            yield
        finally:
            model.load_state_dict(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved as safetensors in a checkpoint); empty outside a window."""
        if self.average is None:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in self.average.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        """Restore a mid-window mean for ``model``'s architecture (an empty state: no window yet)."""
        self.reset()
        if state:
            self.average = AveragedModel(copy.deepcopy(model).cpu(), device=torch.device("cpu"), use_buffers=False)
            self.average.load_state_dict(state)
