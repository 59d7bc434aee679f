"""Slim members: channel scores, schedule and counts, physical removal, the widths record, rebuilding, ONNX."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

import freetickets_hub.model.architectures  # noqa: F401  (registers cifar_wrn*)
from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.artifact.weights import decode_member, encode_member
from freetickets_hub.errors import ArtifactError
from freetickets_hub.export.graph import export_graph
from freetickets_hub.model.widths import create_slim_model, module_widths
from freetickets_hub.training.channel_sparsity import (
    ChannelGraph,
    channel_sparsity_at,
    choose_channels,
    kept_counts,
    removed_positions,
    slice_tensors,
    umm_scores,
    zero_channels,
)
from freetickets_hub.training.sparsity import SparseEngine, SparsityConfig, random_masks

WRN = ("cifar_wrn10_2", (1, 16, 16), {"in_chans": 1})


def _member(architecture: str, kwargs: dict, seed: int = 0, sparsity: float = 0.8):
    """A member with non-trivial norms and exact-count DST masks applied, and its masks."""
    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=10, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            nn.init.uniform_(module.weight, 0.5, 1.5, generator=generator)
            nn.init.normal_(module.bias, 0.0, 0.1, generator=generator)
    masks = random_masks(model, sparsity, "erk", generator)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name in masks:
                weight.mul_(masks[name])
    return model.eval(), masks


def _half(model: nn.Module, graph: ChannelGraph, masks: dict, *, sparsity: float = 0.5) -> dict:
    scores = umm_scores(model, graph.groups, masks)
    counts = kept_counts(graph.groups, scores, sparsity, full=module_widths(model))
    return choose_channels(scores, counts)


def test_the_schedule_is_cubic_and_checked() -> None:
    at = [channel_sparsity_at(step, target=0.6, start=100, end=300) for step in range(0, 401, 50)]
    assert at[:3] == [0.0, 0.0, 0.0] and at[-3:] == [0.6, 0.6, 0.6]
    assert at[4] == pytest.approx(0.6 * (1 - 0.5**3))  # half way: 87.5 % of the target already
    assert all(a <= b for a, b in itertools.pairwise(at))
    with pytest.raises(ValueError, match="target"):
        channel_sparsity_at(0, target=1.0, start=0, end=10)
    with pytest.raises(ValueError, match="end after"):
        channel_sparsity_at(0, target=0.5, start=10, end=10)


def test_umm_is_the_mean_filter_magnitude_with_zeros_averaged_over_a_residual_stream() -> None:
    model, masks = _member(*WRN[::2])
    graph = ChannelGraph(model, WRN[1])
    scores = umm_scores(model, graph.groups, masks)
    stem = next(g for g in graph.groups if g.root == "conv_stem")
    assert torch.allclose(scores["conv_stem"], model.conv_stem.weight.abs().mean((1, 2, 3)))
    stream = next(g for g in graph.groups if any(layer.name == "stages.2.0.shortcut" for layer in g.layers))
    writers = sorted(layer.name for layer in stream.layers if layer.scored)
    assert writers == ["stages.2.0.conv2", "stages.2.0.shortcut"]  # WRN-10-2: one block per stage
    modules = dict(model.named_modules())
    expected = sum(modules[n].weight.abs().mean((1, 2, 3)) for n in writers) / 2
    assert torch.allclose(scores[stream.root], expected)
    assert len(stem.layers) > 1 and stem.width == 16


def test_kept_counts_follow_the_schedule_the_multiple_and_the_floor() -> None:
    model = timm.create_model("cifar_wrn16_4", num_classes=10, in_chans=1)
    graph = ChannelGraph(model, (1, 16, 16))
    full = module_widths(model)
    generator = torch.Generator().manual_seed(0)
    scores = {g.root: torch.rand(g.width, generator=generator) for g in graph.groups}
    total = sum(g.width for g in graph.groups)
    for step in (0, 250, 500, 750, 1000):
        sparsity = channel_sparsity_at(step, target=0.5, start=0, end=1000)
        for allocation in ("global", "uniform"):
            counts = kept_counts(graph.groups, scores, sparsity, full=full, floor=0.25, allocation=allocation)
            for g in graph.groups:
                assert counts[g.root] % 16 == 0 and 16 <= counts[g.root] <= g.width
                assert counts[g.root] >= 0.25 * g.width
            assert abs(sum(counts.values()) - (1 - sparsity) * total) <= 8 * len(graph.groups)
    uniform = kept_counts(graph.groups, scores, 0.5, full=full, allocation="uniform")
    assert {g.width: uniform[g.root] for g in graph.groups} == {16: 16, 64: 32, 128: 64, 256: 128}
    # a group whose channels all score lowest is held at its floor, rounded up to the multiple
    weak = max(graph.groups, key=lambda g: g.width)
    lopsided = {g.root: s + (0.0 if g is weak else 10.0) for g, s in zip(graph.groups, scores.values(), strict=True)}
    counts = kept_counts(graph.groups, lopsided, 0.5, full=full, floor=0.3)
    assert counts[weak.root] == 80  # ceil(0.3 * 256) = 77 -> 80
    with pytest.raises(ValueError, match="allocation"):
        kept_counts(graph.groups, scores, 0.5, full=full, allocation="greedy")


def test_repeated_removal_follows_the_schedule_and_never_grows() -> None:
    model, masks = _member(*WRN[::2])
    full = module_widths(model)
    previous = {g.root: g.width for g in ChannelGraph(model, WRN[1]).groups}
    full_width = dict(previous)
    for sparsity in (0.3, 0.5, 0.7):
        graph = ChannelGraph(model, WRN[1])
        scores = umm_scores(model, graph.groups, masks)
        counts = kept_counts(graph.groups, scores, sparsity, full=full, floor=0.1, allocation="uniform")
        slim = graph.remove(choose_channels(scores, counts), masks)
        masks = slim.masks
        now = {g.root: g.width for g in ChannelGraph(model, WRN[1]).groups}
        assert now == counts and all(now[r] <= previous[r] for r in now)
        previous = now
    # 30 % of 16/32/64/128 channels, rounded to 16: a 16-wide stem stays whole
    assert sorted((full_width[r], n) for r, n in previous.items()) == [(16, 16), (32, 16), (32, 16), (64, 16),
                                                                       (64, 16), (128, 32), (128, 32)]  # fmt: skip
    with pytest.raises(RuntimeError, match="already removed"):
        graph.remove({})


@pytest.mark.parametrize(
    ("architecture", "input_size", "kwargs"),
    [
        WRN,
        ("resnet18", (3, 32, 32), {}),
        ("mobilenetv2_050", (3, 32, 32), {}),
        pytest.param("resnet50", (3, 32, 32), {}, marks=pytest.mark.slow),
    ],
    ids=["wrn_preact_residual", "resnet_residual", "mobilenet_depthwise", "resnet50_bottleneck"],
)
def test_the_physical_model_equals_the_masked_full_width_model(architecture, input_size, kwargs) -> None:
    model, masks = _member(architecture, kwargs)
    graph = ChannelGraph(model, input_size)
    kept = _half(model, graph, masks)
    removal = removed_positions(graph.groups, kept)
    full = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    zero_channels(reference, removal)
    expected_state = slice_tensors(model.state_dict(), removal)
    slim = graph.remove(kept, masks)
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(x) - full(x)).abs().max() > 1e-2  # the removal changes the function...
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)  # ...exactly as zeroing does
    state = model.state_dict()
    assert set(state) == set(expected_state)
    for name, tensor in state.items():  # Torch-Pruning sliced every tensor where our records say
        assert torch.equal(tensor, expected_state[name]), name
    assert set(slim.masks) == set(masks)
    for name, mask in slim.masks.items():  # the DST masks follow: same shape, nothing alive outside
        assert mask.shape == state[name].shape and not state[name][~mask].any(), name
    assert sum(p.numel() for p in model.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    assert slim.widths == module_widths(model)
    rebuilt = create_slim_model(architecture, slim.widths, num_classes=10, **kwargs).eval()
    rebuilt.load_state_dict(state, strict=True)  # timm's rebuilder gives the same shapes (BatchNormAct2d too)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


def test_different_scores_keep_different_channels() -> None:
    a, masks_a = _member(*WRN[::2], seed=0)
    b, masks_b = _member(*WRN[::2], seed=1)
    kept_a = _half(a, ChannelGraph(a, WRN[1]), masks_a)
    kept_b = _half(b, ChannelGraph(b, WRN[1]), masks_b)
    assert any(not torch.equal(kept_a[r], kept_b[r]) for r in kept_a if len(kept_a[r]) < 128)
    assert all(torch.equal(kept_a[r], v) for r, v in _half(a, ChannelGraph(a, WRN[1]), masks_a).items())
    generator = torch.Generator().manual_seed(5)
    graph = ChannelGraph(a, WRN[1])
    first = {g.root: torch.rand(g.width, generator=generator) for g in graph.groups}
    second = {g.root: torch.rand(g.width, generator=generator) for g in graph.groups}
    counts = kept_counts(graph.groups, first, 0.5, full=module_widths(a), allocation="uniform")
    one, two = choose_channels(first, counts), choose_channels(second, counts)
    assert any(not torch.equal(one[r], two[r]) for r in one if counts[r] < 64)


def _slim_wrn(seed: int = 0, sparsity: float = 0.5):
    model, masks = _member(*WRN[::2], seed=seed)
    graph = ChannelGraph(model, WRN[1])
    return model, graph.remove(_half(model, graph, masks, sparsity=sparsity), masks)


def test_a_slim_member_rebuilds_from_its_widths_and_loads_strictly() -> None:
    model, slim = _slim_wrn()
    widths = json.loads(json.dumps(slim.widths))  # what config.json would hold
    tensors = encode_member(0, model.state_dict(), slim.masks)  # the artifact's codec, at physical shapes
    rebuilt = create_slim_model("cifar_wrn10_2", widths, num_classes=10, in_chans=1).eval()
    state, masks, used = decode_member(0, tensors, rebuilt.state_dict())
    assert used == set(tensors) and set(masks) == set(slim.masks)
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(3, *WRN[1])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)
    assert rebuilt.num_features == widths["fc"][1] < 128


def test_a_wrong_width_or_a_missing_tensor_is_refused_by_name() -> None:
    model, slim = _slim_wrn()
    tensors = encode_member(0, model.state_dict(), slim.masks)
    wrong = copy.deepcopy(slim.widths)
    wrong["stages.1.0.conv1"][0] += 16
    template = create_slim_model("cifar_wrn10_2", wrong, num_classes=10, in_chans=1).state_dict()
    with pytest.raises(ArtifactError, match=r"members\.0\.stages\.1\.0\.conv1\.weight"):
        decode_member(0, tensors, template)
    right = create_slim_model("cifar_wrn10_2", slim.widths, num_classes=10, in_chans=1).state_dict()
    del tensors["members.0.stages.1.0.bn2.running_var"]
    with pytest.raises(ArtifactError, match=r"members\.0\.stages\.1\.0\.bn2\.running_var' is missing"):
        decode_member(0, tensors, right)
    build = {"num_classes": 10, "in_chans": 1}
    cases = {
        "misses layer": {k: v for k, v in slim.widths.items() if k != "stages.0.0.bn2"},
        "does not have": {**slim.widths, "stages.3.0.conv1": [8, 8]},
        "wider than": {**slim.widths, "stages.0.0.conv1": [64, 16]},
        "positive integer": {**slim.widths, "norm": [0]},
        "cannot be built": {**slim.widths, "fc": [5, slim.widths["fc"][1]]},
    }
    for message, widths in cases.items():
        with pytest.raises(ArtifactError, match=message):
            create_slim_model("cifar_wrn10_2", widths, **build)


def test_a_grouped_convolution_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"grouped convolutions cannot be slimmed yet: \['1'\]"):
        ChannelGraph(model, (3, 8, 8))


def test_an_ensemble_of_slim_members_exports_to_onnx_equal_to_torch(tmp_path) -> None:
    members = [_slim_wrn(0)[0], _slim_wrn(1, sparsity=0.3)[0]]
    config = EnsembleConfig(
        "cifar_wrn10_2",
        10,
        model_args={"in_chans": 1},
        pretrained_cfg={"input_size": [1, 16, 16], "mean": [0.5], "std": [0.5]},
        ensemble={"num_members": 2, "sparsity": 0.8, "distribution": "erk"},
    )
    ensemble = EnsembleModel(config)
    ensemble.members = nn.ModuleList(members)
    assert module_widths(members[0]) != module_widths(members[1])  # different channels, different widths
    export_graph(ensemble, tmp_path / "slim.onnx")
    session = ort.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    probs, member_probs = session.run(["probs", "member_probs"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        out = ensemble.eval()(x)
    np.testing.assert_allclose(probs, out.probs.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(member_probs, out.member_probs.numpy(), atol=1e-5, rtol=0)


def test_the_sparse_engine_keeps_training_a_slim_member_on_its_sliced_masks() -> None:
    model, slim = _slim_wrn()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = SparseEngine(model, optimizer, SparsityConfig(update_interval=1), seed=0, masks=slim.masks)
    counts = {name: int(mask.sum()) for name, mask in slim.masks.items()}
    x, y = torch.randn(8, *WRN[1]), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    engine.step(1)  # a prune-and-regrow update at the slim shapes
    assert {name: int(mask.sum()) for name, mask in engine.masks.items()} == counts
    weights = dict(model.named_parameters())
    assert all(not weights[name][~mask].any() for name, mask in engine.masks.items())
