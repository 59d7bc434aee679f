"""FLOPs by the RigL convention, checked against hand counts on a two-layer net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freetickets_hub.training.costs import forward_flops, layer_flops, training_flops


def _two_layer_net() -> nn.Module:
    # conv 1->2 channels, 3x3, on a 1x4x4 image: output 2x2x2; then a linear 8 -> 3
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def test_dense_flops_match_a_hand_count() -> None:
    flops = layer_flops(_two_layer_net(), (1, 4, 4))
    conv = 2 * (2 * 2 * 2) * (1 * 3 * 3)  # 2 FLOPs (multiply + add) per output element per input tap
    linear = 2 * 8 * 3
    assert flops.per_weight == {"0.weight": conv, "3.weight": linear}
    assert flops.other == 0  # ReLU and bias adds are not counted, as in RigL
    assert flops.dense == conv + linear == 192


def test_sparse_flops_scale_each_layer_by_its_density() -> None:
    model = _two_layer_net()
    masks = {"0.weight": torch.zeros(2, 1, 3, 3, dtype=torch.bool)}
    masks["0.weight"].view(-1)[:9] = True  # half the conv weights
    assert forward_flops(model, (1, 4, 4), masks) == pytest.approx(144 * 0.5 + 48)
    assert layer_flops(model, (1, 4, 4)).sparse({"3.weight": 0.25}) == pytest.approx(144 + 48 * 0.25)


def test_training_flops_rigl_convention() -> None:
    # 3 forward-equivalents per image at the sparse cost; a dense-gradient batch adds f_dense - f_sparse per image
    assert training_flops(f_sparse=40.0, f_dense=100.0, images=1000, dense_gradient_images=0) == 120_000
    assert training_flops(f_sparse=40.0, f_dense=100.0, images=1000, dense_gradient_images=128) == 120_000 + 60 * 128
    assert training_flops(f_sparse=100.0, f_dense=100.0, images=10, dense_gradient_images=10) == 3000  # dense
