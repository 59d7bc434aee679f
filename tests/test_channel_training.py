"""``structure: channel`` (issue 23): Chase's channel removal inside DST and EDST, and the slim tickets it yields."""

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
from freetickets_hub.model.widths import create_slim_model
from freetickets_hub.training.channel_sparsity import ablation_scores
from freetickets_hub.training.channel_training import ChannelPruner
from freetickets_hub.training.recipe import Recipe, load_recipe
from freetickets_hub.training.sparsity import SparseEngine

from .test_resume import train_tiny

CHANNEL = ("structure=channel", "channel_sparsity=0.5", "update_interval=1")
DST = ("method=dst", "epochs=3", *CHANNEL)
INPUT = (1, 12, 12)
PHASE_STEPS = 20


def _trained(seed: int, recipe: Recipe) -> tuple[torch.nn.Module, SparseEngine, ChannelPruner, list[int]]:
    """A WRN-10-2 through one ticket phase of SGD on random data, the pruner called after every step."""
    torch.manual_seed(seed)
    model = timm.create_model("cifar_wrn10_2", num_classes=3, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = SparseEngine(model, optimizer, recipe.sparsity_config(), seed=seed)
    pruner = ChannelPruner(model, engine, recipe, INPUT)
    removed = []
    for step in range(1, PHASE_STEPS + 1):
        images, labels = torch.randn(8, *INPUT), torch.randint(0, 3, (8,))
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        engine.step(step)
        optimizer.zero_grad()
        pruner.step(model, step, PHASE_STEPS)
        removed.append(pruner.removed())
    return model, engine, pruner, removed


def _recipe(*extra: str) -> Recipe:
    return load_recipe(None, ["method=dst", "structure=channel", "channel_sparsity=0.5", "update_interval=2", *extra])


def test_channels_follow_the_schedule_the_floor_and_the_multiple() -> None:
    recipe = _recipe()
    _, engine, pruner, removed = _trained(0, recipe)
    end = round(recipe.channel_end * PHASE_STEPS)
    assert removed == sorted(removed) and removed[0] == 0  # monotone; step 1 is off the update steps
    assert all(removed[i] == removed[i - 1] for i in range(1, PHASE_STEPS) if (i + 1) % 2 and i + 1 != end)
    assert removed[end - 1] == removed[-1] > 0  # nothing after the schedule's end
    total = sum(g.width for g in pruner.groups)
    assert 0.3 < removed[-1] / total <= 0.5 + 16 * len(pruner.groups) / total  # the target, up to rounding
    for group in pruner.groups:
        kept = len(pruner.kept[group.root])
        assert kept == group.width if group.width <= 16 else kept % 16 == 0, group.root
        assert kept >= recipe.channel_floor * group.width
    # removed channels stay empty, and no regrowth goes there
    weights = engine.weights
    engine.update(0.5, "random")
    for (layer, dim), positions in pruner.removal.items():
        name = f"{layer}.weight"
        if name in weights and weights[name].dim() > 1:
            for tensor in (weights[name], engine.masks[name]):
                assert not (tensor[positions] if dim == "out" else tensor[:, positions]).any(), name


def test_the_slim_ticket_computes_what_the_masked_full_width_model_does() -> None:
    recipe = _recipe()
    model, engine, pruner, _ = _trained(0, recipe)
    model.eval()
    state, masks, widths = pruner.slim(model, engine.masks)
    slim = create_slim_model("cifar_wrn10_2", widths, num_classes=3, in_chans=1).eval()
    slim.load_state_dict(state)
    assert all(masks[n].shape == p.shape for n, p in slim.named_parameters() if n in masks)
    images = torch.randn(16, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(slim(images), model(images), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in slim.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    other = _trained(1, recipe)[2]  # another seed keeps other channels
    assert any(not torch.equal(pruner.kept[r], other.kept[r]) for r in pruner.kept)


def test_restore_brings_every_channel_back_alive_at_each_layers_count() -> None:
    recipe = _recipe()
    model, engine, pruner, _ = _trained(0, recipe)
    bn = next(layer for (layer, _), _ in pruner.removal.items() if "bn" in layer or "norm" in layer)
    gone = pruner.removal[(bn, "out")]
    assert not dict(model.named_modules())[bn].weight[gone].any()
    fresh = lambda: timm.create_model("cifar_wrn10_2", num_classes=3, in_chans=1)  # noqa: E731
    grown = pruner.restore(model, fresh, torch.Generator().manual_seed(0))
    assert grown > 0 and pruner.removed() == 0 and not engine.forbidden and not pruner.removal
    weights = engine.weights
    for name, count in engine.counts.items():
        active = int(engine.masks[name].sum()) if name in engine.masks else weights[name].numel()
        assert active == count, name  # each layer back at its own ERK count
    assert torch.equal(dict(model.named_modules())[bn].weight[gone], torch.ones(len(gone)))  # timm's norm init


def test_ablation_ranks_channels_by_the_mask_share_they_keep() -> None:
    model = timm.create_model("cifar_wrn10_2", num_classes=3, in_chans=1)
    recipe = _recipe()
    engine = SparseEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe.sparsity_config(), seed=0)
    pruner = ChannelPruner(model, engine, recipe, INPUT)
    group = next(g for g in pruner.groups if len([layer for layer in g.layers if layer.scored]) == 1)
    layer = next(layer for layer in group.layers if layer.scored)
    weight = dict(model.named_modules())[layer.name].weight
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[layer.positions[3]] = False
    mask[layer.positions[5]].view(-1)[: weight[0].numel() // 2] = False
    scores = ablation_scores(model, [group], {f"{layer.name}.weight": mask})[group.root]
    assert scores[3] == 0.0 and 0.4 < scores[5] < 0.6 and scores[0] == 1.0


def test_recipe_keys_are_checked() -> None:
    with pytest.raises(RecipeError, match="structure 'channel' needs method 'dst' or 'edst'"):
        load_recipe(None, ["method=dense_ensemble", "structure=channel", "channel_sparsity=0.5"])
    with pytest.raises(RecipeError, match="structure 'channel' needs channel_sparsity"):
        load_recipe(None, ["structure=channel"])
    with pytest.raises(RecipeError, match=r"'channel_end'.*must come after 'channel_start'"):
        load_recipe(None, [*CHANNEL, "channel_start=0.5", "channel_end=0.5"])
    with pytest.raises(RecipeError, match=r"'channel_end'.*before the averaging window"):
        load_recipe(None, [*CHANNEL, "average_fraction=0.5"])
    with pytest.raises(RecipeError, match="channel_criterion"):
        load_recipe(None, [*CHANNEL, "channel_criterion=l1"])
    assert load_recipe(None).structure == "unstructured"  # every existing recipe is unchanged


def test_slim_dst_trains_loads_exports_merges_and_fine_tunes(tmp_path: Path, tiny_dataset: Path) -> None:
    assert train_tiny(tmp_path / "a", tiny_dataset, overrides=DST) == 0
    assert train_tiny(tmp_path / "b", tiny_dataset, overrides=(*DST, "seed=7", "channel_criterion=ablation")) == 0
    ensemble = json.loads((tmp_path / "a" / "config.json").read_text())["ensemble"]
    assert ensemble["format_version"] == 2 and len(ensemble["member_widths"]) == 2
    model = EnsembleModel.from_pretrained(tmp_path / "a")
    full = timm.create_model("cifar_wrn10_2", num_classes=len(model.config.label_names), in_chans=1)
    assert sum(p.numel() for p in model.members[0].parameters()) < 0.6 * sum(p.numel() for p in full.parameters())
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["channels"]["kept_overlap"]["0-1"] < 1.0  # the members kept different channels
    assert summary["costs"]["inference_flops_member"] < 0.5 * summary["costs"]["inference_flops_dense_member"]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "channel_end" in card and "channel_sparsity" in card and "refine_lrs" not in card
    assert main(["export", "onnx", str(tmp_path / "a")]) == 0  # the export's own parity gate: 1e-5
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "config.json").read_text())["ensemble"]
    assert (
        merged["member_widths"]
        == ensemble["member_widths"]
        + json.loads((tmp_path / "b" / "config.json").read_text())["ensemble"]["member_widths"]
    )
    args = ["finetune", str(tmp_path / "a"), "--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "ft")]
    assert main([*args, "--set", "epochs=1", "--set", "val_size=0", "--set", "batch_size=16"]) == 0
    tuned = json.loads((tmp_path / "ft" / "config.json").read_text())["ensemble"]
    assert tuned["member_widths"] == ensemble["member_widths"]  # frozen-masks keeps the channels


@pytest.mark.parametrize(
    ("overrides", "stop_at"),
    [
        (DST, 4),  # mid-schedule of the first member
        (("method=edst", *CHANNEL), 11),  # after the escape that restored the channels, mid-refinement 2
    ],
)
def test_resume_is_bit_exact(tmp_path: Path, tiny_dataset: Path, overrides: tuple[str, ...], stop_at: int) -> None:
    assert train_tiny(tmp_path / "full", tiny_dataset, overrides=overrides) == 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--max-steps", str(stop_at), overrides=overrides) == 0
    assert train_tiny(tmp_path / "cut", tiny_dataset, "--resume", overrides=overrides) == 0
    full, cut = (EnsembleModel.from_pretrained(tmp_path / d) for d in ("full", "cut"))
    assert full.config.ensemble.member_widths == cut.config.ensemble.member_widths
    for a, b in zip(full.members, cut.members, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    summaries = [json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("full", "cut")]
    assert summaries[0]["channels"] == summaries[1]["channels"]
    assert summaries[0]["channels"]["kept_overlap"]["0-1"] < 1.0  # EDST: each ticket chose its own channels
