"""CigL's random weight mask (``random_mask_rate``): the rate is realised in training forward passes,
dropped weights get no gradient, the weights and inference are untouched, draws depend on the seed only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freetickets_hub import EnsembleModel
from freetickets_hub.errors import RecipeError
from freetickets_hub.training import random_mask
from freetickets_hub.training.random_mask import forward_with_random_mask, keep_masks
from freetickets_hub.training.recipe import Recipe

from .test_averaging import _train


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.ReLU(), torch.nn.Linear(300, 5))


def test_rate_is_realised_and_the_draw_depends_on_the_seed_only() -> None:
    net = _net()
    masks = keep_masks(net, 0.1, seed=7)
    dropped = 1 - torch.cat([m.flatten().float() for m in masks.values()]).mean().item()
    assert abs(dropped - 0.1) < 0.005  # 61 500 weights: a binomial sd of 0.0012
    torch.manual_seed(123)  # process RNG plays no part
    again = keep_masks(net, 0.1, seed=7)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert not torch.equal(masks["0.weight"], keep_masks(net, 0.1, seed=8)["0.weight"])


def test_dropped_weights_get_no_gradient_and_the_weights_are_untouched() -> None:
    net = _net()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 200)
    out = forward_with_random_mask(net, x, 0.3, seed=3)
    out.sum().backward()
    keep = keep_masks(net, 0.3, seed=3)
    for name, weight in (("0.weight", net[0].weight), ("2.weight", net[2].weight)):
        assert torch.all(weight.grad[~keep[name]] == 0), name
        assert (weight.grad[keep[name]] != 0).float().mean() > 0.5, name
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # weights never changed
    with torch.no_grad():  # the same pass by hand: weights times the keep-mask
        manual = torch.nn.functional.linear(x, net[0].weight * keep["0.weight"], net[0].bias).relu()
        manual = torch.nn.functional.linear(manual, net[2].weight * keep["2.weight"], net[2].bias)
    torch.testing.assert_close(out.detach(), manual)
    assert torch.equal(forward_with_random_mask(net, x, 0.0, seed=3), net(x))  # rate 0: the plain model


def test_rate_outside_range_is_refused() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(RecipeError, match="random_mask_rate"):
            Recipe(random_mask_rate=bad)


@pytest.mark.slow
def test_training_draws_masks_and_resume_mid_run_is_bit_exact(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ("random_mask_rate=0.1", "average_fraction=0.67")
    calls: list[int] = []
    real = random_mask.keep_masks
    monkeypatch.setattr(random_mask, "keep_masks", lambda m, r, s: (calls.append(s), real(m, r, s))[1])
    assert _train(tmp_path / "full", tiny_dataset, overrides=overrides) == 0
    assert calls and len(set(calls)) == len(calls)  # a fresh mask every training step
    assert _train(tmp_path / "cut", tiny_dataset, "--max-steps", "5", overrides=overrides) == 0
    assert _train(tmp_path / "cut", tiny_dataset, "--resume", overrides=overrides) == 0
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), f"{key} differs after resume"


def test_default_recipe_draws_no_mask(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("random mask drawn without random_mask_rate")

    monkeypatch.setattr(random_mask, "keep_masks", refuse)
    assert _train(tmp_path, tiny_dataset, overrides=("method=dst", "epochs=1")) == 0


def test_trained_model_predicts_without_a_random_mask(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mask lives only in training forward passes: the artifact holds the same tensor names and shapes
    as a run without it (nothing of the mask is stored), and loading and predicting never draw one (the
    drawing function is replaced by one that fails; two passes agree bitwise)."""
    assert _train(tmp_path / "masked", tiny_dataset, overrides=("method=dst", "epochs=1", "random_mask_rate=0.5")) == 0
    assert _train(tmp_path / "plain", tiny_dataset, overrides=("method=dst", "epochs=1")) == 0
    masked, plain = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("masked", "plain"))
    assert masked.keys() == plain.keys()
    assert {k: v.shape for k, v in masked.items()} == {k: v.shape for k, v in plain.items()}

    def refuse(*_: object) -> None:
        raise AssertionError("a random mask was drawn at inference")

    monkeypatch.setattr(random_mask, "keep_masks", refuse)
    model = EnsembleModel.from_pretrained(tmp_path / "masked").eval()
    pixels = torch.rand(4, *model.config.pretrained_cfg["input_size"])
    with torch.no_grad():
        first, second = model(pixels).logits, model(pixels).logits
    assert torch.equal(first, second)
