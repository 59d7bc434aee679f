"""``narrow_dense_ensemble``: M dense members built at a fraction of the width (Packed-Ensembles, gamma=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from freetickets_hub import EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.errors import RecipeError
from freetickets_hub.model import architectures as _architectures  # noqa: F401  (registers WRNs)
from freetickets_hub.model.widths import create_slim_model, module_widths
from freetickets_hub.training.channel_sparsity import narrow_widths
from freetickets_hub.training.recipe import load_recipe

from .test_resume import train_tiny

NARROW = ("method=narrow_dense_ensemble", "channel_sparsity=0.5", "epochs=2")


def test_narrow_widths_halve_every_group_in_multiples_of_16() -> None:
    full = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1)
    before = module_widths(full)
    widths = narrow_widths(full, (1, 28, 28), 0.5, multiple=16)
    assert module_widths(full) == before  # the model itself is left alone
    convs = {n: w for n, w in widths.items() if isinstance(dict(full.named_modules())[n], torch.nn.Conv2d)}
    assert all(w[0] % 16 == 0 for w in convs.values())
    for name, (out, *_) in convs.items():
        full_out = before[name][0]
        assert out == (full_out if full_out <= 16 else full_out // 2), name  # the 16-wide stem stays
    slim = create_slim_model("cifar_wrn10_2", widths, num_classes=10, in_chans=1)
    assert slim(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # residual adds agree in width
    assert sum(p.numel() for p in slim.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())


def test_recipe_keys_are_checked() -> None:
    with pytest.raises(RecipeError, match="'narrow_dense_ensemble' needs channel_sparsity in"):
        load_recipe(None, ["method=narrow_dense_ensemble"])
    with pytest.raises(
        RecipeError, match="'channel_sparsity' is read by method 'narrow_dense_ensemble' and structure 'channel' only"
    ):
        load_recipe(None, ["channel_sparsity=0.5"])
    with pytest.raises(RecipeError, match=r"channel_sparsity.*\[0, 1\)"):
        load_recipe(None, ["method=narrow_dense_ensemble", "channel_sparsity=1.0"])
    with pytest.raises(RecipeError, match="channel_multiple"):
        load_recipe(None, ["method=narrow_dense_ensemble", "channel_sparsity=0.5", "channel_multiple=0"])


def test_trains_slim_dense_members_that_load_at_their_widths(tmp_path: Path, tiny_dataset: Path) -> None:
    assert train_tiny(tmp_path / "narrow", tiny_dataset, overrides=NARROW) == 0
    model = EnsembleModel.from_pretrained(tmp_path / "narrow")
    ensemble = json.loads((tmp_path / "narrow" / "config.json").read_text())["ensemble"]
    assert ensemble["method"] == "narrow_dense_ensemble" and ensemble["format_version"] == 2
    assert ensemble["sparsity"] == 0.0 and ensemble["member_widths"][0] == ensemble["member_widths"][1]
    assert all(not masks for masks in model.masks)  # dense members: no masks stored
    first, second = (dict(m.named_parameters()) for m in model.members)
    stem = next(iter(first))
    assert not torch.equal(first[stem], second[stem])  # seeded apart, like a dense ensemble
    assert module_widths(model.members[0]) == ensemble["member_widths"][0]
    costs = json.loads((tmp_path / "narrow" / "train_summary.json").read_text())["costs"]
    full = timm.create_model("cifar_wrn10_2", num_classes=len(model.config.label_names), in_chans=1)
    assert costs["params_total_per_member"] == sum(p.numel() for p in full.parameters())  # against full width
    assert costs["inference_flops_member"] < 0.35 * costs["inference_flops_dense_member"]
    assert costs["training_flops_ratio_vs_dense_same_steps"] < 0.35
    card = (tmp_path / "narrow" / "README.md").read_text()
    assert "narrow dense ensemble" in card and "channel_sparsity" in card and "refine_lrs" not in card
    assert main(["export", "onnx", str(tmp_path / "narrow")]) == 0  # the export's own parity gate: 1e-5
    args = ["finetune", str(tmp_path / "narrow"), "--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "ft")]
    assert main([*args, "--set", "epochs=1", "--set", "val_size=0", "--set", "batch_size=16"]) == 0
    tuned = json.loads((tmp_path / "ft" / "config.json").read_text())["ensemble"]
    assert tuned["method"] == "narrow_dense_ensemble" and tuned["member_widths"] == ensemble["member_widths"]


def test_resume_is_bit_exact(tmp_path: Path, tiny_dataset: Path) -> None:
    assert train_tiny(tmp_path / "full", tiny_dataset, overrides=NARROW) == 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--max-steps", "5", overrides=NARROW) == 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--resume", overrides=NARROW) == 0
    full, cut = (EnsembleModel.from_pretrained(tmp_path / d) for d in ("full", "cut"))
    for a, b in zip(full.members, cut.members, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
