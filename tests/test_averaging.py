"""Per-ticket weight averaging (``average_fraction``): the ticket is the mean of its phase's last
iterates, masks frozen over the window, BatchNorm recomputed on the training split, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.optim.swa_utils import update_bn

from freetickets_hub import EnsembleModel
from freetickets_hub.errors import RecipeError
from freetickets_hub.training import averaging
from freetickets_hub.training.averaging import TicketAverage, cycle_position, in_window
from freetickets_hub.training.checkpoint import AVERAGE_FILE
from freetickets_hub.training.recipe import Recipe

from .test_resume import train_tiny

AVERAGING_RUN = ("update_interval=1", "explore_epochs=1", "growth=random")  # over test_resume's tiny run


def _train(out: Path, dataset: Path, *extra: str, overrides: tuple[str, ...] = ()) -> int:
    return train_tiny(out, dataset, *extra, overrides=(*AVERAGING_RUN, *overrides))


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_window_is_the_last_fraction_of_the_phase() -> None:
    assert [s for s in range(1, 11) if in_window(s, 10, 0.3)] == [8, 9, 10]
    assert [s for s in range(1, 11) if in_window(s, 10, 0.01)] == [10]  # at least the last step
    assert not any(in_window(s, 10, 0.0) for s in range(1, 11))  # off by default


def test_average_is_the_mean_of_the_iterates_and_bn_is_recomputed() -> None:
    torch.manual_seed(0)
    model, average, iterates = _net(), TicketAverage(), []
    batches = [torch.randn(8, 3) for _ in range(3)]
    for batch in batches:  # iterates that move, BatchNorm statistics that move with them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(batch)
        average.update(model)
        iterates.append([p.detach().clone() for p in model.parameters()])
    last = {k: v.clone() for k, v in model.state_dict().items()}
    assert average.count == 3
    with average.applied(model, batches):
        for own, *stored in zip(model.parameters(), *iterates, strict=True):
            torch.testing.assert_close(own, torch.stack(stored).mean(0))
        fresh = _net()
        fresh.load_state_dict(model.state_dict())
        fresh.get_submodule("1").reset_running_stats()
        update_bn(batches, fresh)  # a fresh pass over the same data
        bn = model.get_submodule("1")
        assert torch.equal(bn.running_mean, fresh.get_submodule("1").running_mean)
        assert torch.equal(bn.running_var, fresh.get_submodule("1").running_var)
        assert not torch.allclose(bn.running_mean, last["1.running_mean"])
    for key, value in model.state_dict().items():  # training goes on from the last iterate
        assert torch.equal(value, last[key]), key


def test_state_dict_round_trip_continues_the_same_mean() -> None:
    torch.manual_seed(0)
    model, first = _net(), TicketAverage()
    first.update(model)
    restored = TicketAverage()
    restored.load_state_dict(first.state_dict(), model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    first.update(model)
    restored.update(model)
    assert restored.count == 2
    for key, value in first.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert TicketAverage().state_dict() == {}


def test_cycles_split_the_window_and_end_on_its_last_step() -> None:
    # a 10-step phase, window 6 (steps 5..10), 3 cycles of 2 steps
    positions = [cycle_position(s, 10, 0.6, 3) for s in range(5, 11)]
    assert [p.progress for p in positions] == [0.5, 1.0] * 3
    assert [s for s, p in zip(range(5, 11), positions, strict=True) if p.last] == [6, 8, 10]
    # a window of 7 in 3 cycles: 3 + 2 + 2 steps, every step in exactly one cycle
    uneven = [cycle_position(s, 7, 1.0, 3) for s in range(1, 8)]
    assert [s for s in range(1, 8) if uneven[s - 1].last] == [3, 5, 7]
    assert uneven[0].progress == pytest.approx(1 / 3) and uneven[3].progress == 0.5
    assert [cycle_position(s, 4, 0.5, 9).last for s in (3, 4)] == [True, True]  # more cycles than steps: one each


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"average_cycles": 2}, "set average_fraction"),
        ({"average_fraction": 0.5, "average_cycles": -1}, "average_cycles"),
        ({"average_fraction": 0.5, "average_cycles": 2, "average_cycle_lr": 0.0}, "average_cycle_lr"),
        ({"average_fraction": 0.5, "average_cycle_lr": 0.1}, "needs average_cycles"),
    ],
)
def test_cycle_keys_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe(**overrides)


def test_cyclic_window_lr_and_the_tickets_it_averages(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 steps an epoch; refinements of 4 epochs (12 steps, LR 0.001 from step 7); window: steps 7-12, 2 cycles."""
    logged: dict[int, float] = {}
    original_log = Accelerator.log

    def log(self: Accelerator, values: dict, step: int | None = None, **kwargs: object) -> None:
        logged[step] = values["train/lr"]
        original_log(self, values, step=step, **kwargs)

    averaged: list[int] = []
    update = TicketAverage.update
    monkeypatch.setattr(Accelerator, "log", log)
    monkeypatch.setattr(TicketAverage, "update", lambda self, model: (averaged.append(1), update(self, model)))
    cyclic = ("refine_epochs=4", "average_fraction=0.5", "average_cycles=2")
    assert _train(tmp_path, tiny_dataset, overrides=cyclic) == 0
    first_refine = [logged[s] for s in range(4, 16)]  # exploration is steps 1-3
    assert first_refine[:6] == [0.01] * 6  # the phase's own schedule before the window
    assert first_refine[6:] == pytest.approx([0.007, 0.004, 0.001] * 2)  # 10x the window's LR down to it, twice
    assert len(averaged) == 2 * 2  # the cycles' last iterates only, in each of the 2 refinement phases


@pytest.mark.parametrize("bad", ["-0.1", "1.5"])
def test_fraction_outside_unit_interval_is_refused(bad: str) -> None:
    with pytest.raises(RecipeError, match="average_fraction"):
        Recipe(average_fraction=float(bad))
    with pytest.raises(RecipeError, match="ticket_selection: last"):
        Recipe(average_fraction=0.5, ticket_selection="best_val")


@pytest.mark.slow
def test_edst_ticket_is_the_mean_of_its_window_masks_frozen_bn_recomputed(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored: list[dict[str, torch.Tensor]] = []
    update = TicketAverage.update

    def recording(self: TicketAverage, model: torch.nn.Module) -> None:
        stored.append({k: v.detach().clone() for k, v in model.named_parameters()})
        update(self, model)

    monkeypatch.setattr(TicketAverage, "update", recording)
    bn_passes: list[int] = []
    real_update_bn = averaging.update_bn
    monkeypatch.setattr(averaging, "update_bn", lambda b, m: (bn_passes.append(1), real_update_bn(b, m)))
    assert _train(tmp_path, tiny_dataset, overrides=("average_fraction=0.67",)) == 0
    # 3 steps an epoch: refine phases of 3 steps, the last 2 averaged
    assert len(stored) == 4 and len(bn_passes) == 2
    model = EnsembleModel.from_pretrained(tmp_path)  # decodes the bit-packed sparse weights
    for member, window in enumerate((stored[:2], stored[2:])):
        tickets = dict(model.members[member].named_parameters())
        for name in window[0]:
            ticket = tickets[name].detach()
            torch.testing.assert_close(ticket, torch.stack([w[name] for w in window]).mean(0))
            zeros = ticket == 0
            if zeros.float().mean() > 0.5:  # a masked weight: every iterate in the window has its mask
                for iterate in window:
                    assert torch.equal(iterate[name][zeros], torch.zeros_like(iterate[name][zeros])), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "stop"),
    [
        (("average_fraction=0.67",), 5),  # 1 iterate in
        (("refine_epochs=2", "average_fraction=0.67", "average_cycles=2"), 8),  # 1 cycle done, mid the second
    ],
)
def test_resume_mid_window_is_bit_exact(
    tmp_path: Path, tiny_dataset: Path, overrides: tuple[str, ...], stop: int
) -> None:
    assert _train(tmp_path / "full", tiny_dataset, overrides=overrides) == 0
    assert _train(tmp_path / "cut", tiny_dataset, "--max-steps", str(stop), overrides=overrides) == 0
    (checkpoint,) = (tmp_path / "cut" / "checkpoints").glob("step_*")
    assert (checkpoint / AVERAGE_FILE).is_file()
    assert _train(tmp_path / "cut", tiny_dataset, "--resume", overrides=overrides) == 0
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), f"{key} differs after resume"


def test_default_recipe_never_averages(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("averaged without average_fraction")

    monkeypatch.setattr(TicketAverage, "update", refuse)
    monkeypatch.setattr(averaging, "update_bn", refuse)
    assert _train(tmp_path, tiny_dataset, overrides=("method=dst", "epochs=1")) == 0
