"""Sparse engine invariants: exact ERK counts, masks hold after steps, prune/grow and escape rules."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import freetickets_hub.model.architectures  # noqa: F401
from freetickets_hub.training.sparsity import (
    SparseEngine,
    SparsityConfig,
    layer_densities,
    magnitude_prune,
    maskable_weights,
    nonzero_counts,
    prune_rate_at,
)


def _setup(
    sparsity: float = 0.8, distribution: str = "erk", growth: str = "gradient", seed: int = 0, optim: str = "sgd"
):
    torch.manual_seed(seed)
    model = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1)
    if optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = SparsityConfig(
        sparsity=sparsity, distribution=distribution, growth=growth, update_interval=2, escape_rate=0.8
    )
    return model, optimizer, SparseEngine(model, optimizer, config, seed=seed)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_maskable_weights_are_every_conv_and_linear_weight() -> None:
    model = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1)
    names = set(maskable_weights(model))
    assert "conv_stem.weight" in names and "fc.weight" in names  # first conv and classifier included
    assert not any("bn" in n or n.endswith("bias") for n in names)
    assert len(names) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


def test_erk_solves_total_budget_and_caps_dense_layers() -> None:
    shapes = {"stem": (16, 1, 3, 3), "mid": (64, 64, 3, 3), "big": (128, 128, 3, 3), "fc": (10, 128)}
    densities = layer_densities(shapes, 0.8, "erk")
    total = sum(math.prod(s) for s in shapes.values())
    nonzeros = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    assert nonzeros == pytest.approx(0.2 * total, rel=1e-9)
    assert densities["stem"] == 1.0  # its ERK density would exceed 1: capped and the rest re-solved
    assert all(0 < d <= 1 for d in densities.values())
    # ERK: density proportional to (sum of dims)/(product of dims) among the sparse layers
    ratio = densities["mid"] / densities["big"]
    expected = (sum(shapes["mid"]) / math.prod(shapes["mid"])) / (sum(shapes["big"]) / math.prod(shapes["big"]))
    assert ratio == pytest.approx(expected)


def test_uniform_distribution_and_bad_values() -> None:
    assert set(layer_densities({"a": (4, 4), "b": (8, 2)}, 0.75, "uniform").values()) == {0.25}
    with pytest.raises(ValueError, match="sparsity must be in"):
        layer_densities({"a": (4, 4)}, 1.0, "erk")
    with pytest.raises(ValueError, match="distribution"):
        layer_densities({"a": (4, 4)}, 0.5, "erdos")


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_realised_counts_equal_target_and_dense_layers_stay_dense(distribution: str) -> None:
    model, _, engine = _setup(distribution=distribution)
    weights = maskable_weights(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    counts = nonzero_counts(shapes, layer_densities(shapes, 0.8, distribution))
    for name, weight in weights.items():
        assert int(torch.count_nonzero(weight)) == counts[name], name
        if counts[name] == weight.numel():
            assert name not in engine.masks  # left dense, never masked
        else:
            assert int(engine.masks[name].sum()) == counts[name]
    total = sum(w.numel() for w in weights.values())
    assert 1 - sum(counts.values()) / total == pytest.approx(0.8, abs=1e-3)
    if distribution == "erk":
        assert "conv_stem.weight" not in engine.masks  # ERK makes the tiny first conv dense


@pytest.mark.parametrize("growth", ["gradient", "random"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_masks_hold_through_steps_and_updates(growth: str, optim: str) -> None:
    model, optimizer, engine = _setup(growth=growth, optim=optim)
    counts = {n: int(m.sum()) for n, m in engine.masks.items()}
    for step in range(1, 7):
        before = {n: m.clone() for n, m in engine.masks.items()}
        _train_step(model, optimizer)
        stats = engine.step(step)
        optimizer.zero_grad()
        for name, mask in engine.masks.items():
            weight = engine.weights[name]
            assert not weight[~mask].any(), f"{name}: masked weight nonzero after step {step}"
            assert int(mask.sum()) == counts[name], f"{name}: nonzero count changed"
            new = mask & ~before[name]  # positions that became active in this update
            if stats is not None:
                assert (weight[new] == 0).all()  # newly active weights start at zero
                state = optimizer.state[weight]
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if key in state:
                        assert (state[key][new] == 0).all(), f"{key} of regrown weights not zeroed"
        assert (stats is not None) == (step % 2 == 0)
    assert engine.num_updates == 3


def test_pruning_drops_exactly_the_smallest_active_magnitudes() -> None:
    model, optimizer, engine = _setup(growth="random")
    engine.config.regrow_pruned = False  # so every pruned position is visible as inactive afterwards
    _train_step(model, optimizer)
    before = {n: m.clone() for n, m in engine.masks.items()}
    magnitudes = {n: engine.weights[n].detach().abs().clone() for n in engine.masks}
    engine.update(0.3, "random")
    for name, mask in engine.masks.items():
        active = before[name]
        dropped = active & ~mask
        count = min(int(0.3 * int(active.sum())), int((~active).sum()))
        assert int(dropped.sum()) == count, name
        # every dropped weight is no larger than every kept one: the smallest |w| of the active set
        assert magnitudes[name][dropped].max() <= magnitudes[name][active & mask].min(), name
        expected = magnitudes[name].masked_fill(~active, float("inf")).flatten().sort().values[:count]
        assert torch.equal(magnitudes[name][dropped].sort().values, expected), name


def test_magnitude_prune_ignores_inactive_positions() -> None:
    weight = torch.tensor([0.0, -0.1, 0.5, -2.0, 0.05, 3.0])
    mask = torch.tensor([False, True, True, True, False, True])  # the zero and 0.05 are inactive
    assert magnitude_prune(weight, mask, 2).tolist() == [False, False, False, True, False, True]


@pytest.mark.parametrize("regrow_pruned", [True, False])
def test_regrowth_of_just_pruned_positions_is_a_setting(regrow_pruned: bool) -> None:
    """Official code and RigL: a pruned position may be regrown (and keeps its value); the other setting forbids it."""
    model, optimizer, engine = _setup()
    engine.config.regrow_pruned = regrow_pruned
    _train_step(model, optimizer)
    name = "stages.1.0.conv1.weight"
    weight = engine.weights[name]
    before, values = engine.masks[name].clone(), weight.detach().clone()
    count = int(0.5 * int(before.sum()))
    pruned = before & ~magnitude_prune(weight, before, count)
    with torch.no_grad():  # make the pruned positions the most attractive to regrow
        weight.grad.abs_().masked_fill_(pruned, 1e6)
    engine.update(0.5, "gradient")
    after = engine.masks[name]
    regrown_pruned = pruned & after
    if regrow_pruned:
        assert torch.equal(regrown_pruned, pruned)  # all pruned positions came straight back
        assert torch.equal(weight[pruned], values[pruned])  # a weight pruned and regrown at once is unchanged
    else:
        assert not regrown_pruned.any()
        assert int((before & ~after).sum()) == min(count, int((~before).sum()))
    assert int(after.sum()) == int(before.sum())


def test_escape_rate_is_q_of_each_layer_when_regrowing_pruned_positions() -> None:
    """Excluding pruned positions caps the count by the inactive ones (0.74 instead of 0.8 on dense layers)."""
    model, optimizer, engine = _setup(sparsity=0.3, distribution="uniform", growth="random")
    _train_step(model, optimizer)
    q_of_active = sum(int(0.8 * int(m.sum())) for m in engine.masks.values())
    assert engine.escape()["regrown"] == q_of_active
    engine.config.regrow_pruned = False
    capped = sum(min(int(0.8 * int(m.sum())), int((~m).sum())) for m in engine.masks.values())
    assert engine.escape()["regrown"] == capped < q_of_active


def test_gradient_growth_picks_largest_gradients() -> None:
    model, optimizer, engine = _setup()
    _train_step(model, optimizer)
    name = "stages.1.0.conv1.weight"
    before = engine.masks[name].clone()
    grad = engine.weights[name].grad.abs()
    engine.update(0.3, "gradient")
    grown = engine.masks[name] & ~before
    candidates = grad[~before]
    threshold = candidates.sort(descending=True).values[int(grown.sum()) - 1]
    assert (grad[grown] >= threshold).all()


def test_escape_changes_about_q_of_active_positions() -> None:
    model, optimizer, engine = _setup()
    engine.config.regrow_pruned = False
    _train_step(model, optimizer)
    before = {n: m.clone() for n, m in engine.masks.items()}
    engine.escape()
    for name, mask in engine.masks.items():
        active = int(before[name].sum())
        changed = int((mask & ~before[name]).sum()) / active
        possible = min(0.8, int((~before[name]).sum()) / active)
        assert changed == pytest.approx(possible, abs=1.0 / active + 1e-9), name
        assert int(mask.sum()) == active


def test_random_draws_are_seeded_and_state_round_trips() -> None:
    _, _, first = _setup(growth="random", seed=3)
    _, _, second = _setup(growth="random", seed=3)
    _, _, other = _setup(growth="random", seed=4)
    assert all(torch.equal(first.masks[n], second.masks[n]) for n in first.masks)
    assert any(not torch.equal(first.masks[n], other.masks[n]) for n in first.masks)
    first.update(0.5, "random")
    second.update(0.5, "random")
    assert all(torch.equal(first.masks[n], second.masks[n]) for n in first.masks)
    second.load_state_dict(other.state_dict())
    assert all(torch.equal(second.masks[n], other.masks[n]) for n in other.masks)


def test_prune_rate_schedules() -> None:
    cfg = SparsityConfig(prune_rate=0.5, prune_rate_schedule="cosine", prune_rate_final=0.005)
    assert prune_rate_at(cfg, 0, 100) == pytest.approx(0.5)
    assert prune_rate_at(cfg, 50, 100) == pytest.approx((0.5 + 0.005) / 2)
    assert prune_rate_at(cfg, 100, 100) == pytest.approx(0.005)
    assert prune_rate_at(SparsityConfig(prune_rate=0.3), 77, 100) == 0.3


def test_no_update_on_the_last_step_of_a_phase() -> None:
    model, optimizer, engine = _setup()
    engine.start_phase(0, 4)
    _train_step(model, optimizer)
    assert engine.step(2) is not None
    assert engine.step(4) is None  # regrown weights would leave the phase at zero
    engine.start_phase(4, 4)
    assert engine.step(6) is not None


class _OneDevicePerOp(TorchDispatchMode):
    """Raise, as CUDA does, when one op mixes tensors of two devices (0-d tensors excepted).

    The ``meta`` device alone accepts CPU operands; under this mode it stands in for a GPU.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise RuntimeError(f"{func}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _move_keeping_parameters(model: torch.nn.Module, *args: object) -> None:
    """``model.to(...)`` keeping each Parameter object, as a CPU -> CUDA move does (the optimizer still holds them)."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(*args)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_engine_follows_the_model_to_another_device_and_dtype(dtype: torch.dtype, growth: str) -> None:
    """The GPU bug: an engine built on the CPU model before ``accelerator.prepare`` moves it."""
    model, optimizer, engine = _setup(growth=growth)
    _move_keeping_parameters(model, "meta", dtype)
    with _OneDevicePerOp():
        for weight in model.parameters():
            weight.grad = torch.randn_like(weight)
        optimizer.step()
        assert engine.step(2) is not None  # re-apply, prune, grow, zero momentum: all on the weights' device
        engine.escape()
    for name, mask in engine.masks.items():
        assert mask.device == engine.weights[name].device == torch.device("meta"), name
    assert engine.weights["fc.weight"] is model.fc.weight


def test_masks_saved_on_one_device_load_onto_the_weights_device() -> None:
    """``--resume`` on another device: checkpointed (CPU) masks follow the model's weights."""
    _, _, saved = _setup(growth="random", seed=3)
    model, _, engine = _setup(growth="random", seed=4)
    _move_keeping_parameters(model, "meta")
    with _OneDevicePerOp():
        engine.load_state_dict(saved.state_dict())
    assert {m.device.type for m in engine.masks.values()} == {"meta"}


def test_engine_check_names_what_it_cannot_fix() -> None:
    model, optimizer, engine = _setup()
    _train_step(model, optimizer)  # momentum buffers now live on the CPU
    _move_keeping_parameters(model, "meta")
    with pytest.raises(RuntimeError, match=r"conv1\.weight: momentum_buffer is on cpu but the weight is on meta"):
        engine.check()
    model, optimizer, engine = _setup()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() makes new Parameter objects
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with pytest.raises(RuntimeError, match="is not a parameter of the engine's optimizer"):
        engine.update(0.5, "gradient")
