"""``export onnx --packed`` (issue 23): members at equal widths as one network of grouped layers.

The packed graph has the same input and outputs as the branch graph, and ONNX Runtime reproduces the
PyTorch ensemble to 1e-5 (the export's own gate); members at different widths, or an architecture
whose weights packing cannot group, are refused by name and nothing is written.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import timm
import torch
from timm.layers import ScaledStdConv2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.errors import ExportError
from freetickets_hub.export.graph import export_graph
from freetickets_hub.export.packed import PackedMembers
from freetickets_hub.export.quantize import stem_nodes, write_int8_graph
from freetickets_hub.model.widths import create_slim_model
from freetickets_hub.training.channel_sparsity import narrow_widths

from .serve_support import running
from .test_slim_artifact import SHAPE, slim_ensemble

INPUT = (1, 16, 16)


def narrow_ensemble(members: int = 3) -> EnsembleModel:
    """``narrow_dense_ensemble``'s layout: every member at half of each group's channels, own init."""
    reference = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1)
    widths = narrow_widths(reference, INPUT, 0.5)
    info = {"method": "narrow_dense_ensemble", "num_members": members}
    info["member_widths"] = [json.loads(json.dumps(widths))] * members
    model = EnsembleModel(EnsembleConfig("cifar_wrn10_2", 10, **SHAPE, ensemble=info))
    for index in range(members):
        torch.manual_seed(index)
        member = create_slim_model("cifar_wrn10_2", widths, num_classes=10, in_chans=1)
        for module in member.modules():  # non-trivial statistics, so a swapped channel would show
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)
        model.load_member(index, member.state_dict(), {})
    return model.eval()


def test_packed_members_equal_the_members_and_group_every_convolution() -> None:
    model = narrow_ensemble()
    packed = PackedMembers(model.members, INPUT).eval()
    x = torch.randn(5, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model.member_logits(x), rtol=0, atol=1e-5)
    convs = [m for m in packed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.groups == 3 for conv in convs)  # the stem too: the input is repeated per member


def test_depthwise_convs_conv_biases_and_timm_norm_act_layers_pack_exactly() -> None:
    members = []
    for seed in range(3):  # mobilenetv3: depthwise convs, squeeze-excite convs with biases, BatchNormAct2d
        torch.manual_seed(seed)
        member = timm.create_model("mobilenetv3_small_050", num_classes=5).eval()
        for module in member.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)
        members.append(member)
    packed = PackedMembers(members, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), torch.stack([m(x) for m in members]), rtol=0, atol=1e-5)


def test_export_packed_writes_one_grouped_graph_with_the_same_outputs(tmp_path: Path) -> None:
    model = narrow_ensemble()
    model.save_pretrained(tmp_path / "narrow")
    assert main(["export", "onnx", str(tmp_path / "narrow"), "--packed"]) == 0  # gate: probs to 1e-5
    report = json.loads((tmp_path / "narrow" / "onnx" / "export_report.json").read_text())
    assert report["packed"] is True and report["max_abs_diff"]["probs"] <= 1e-5
    graph = onnx.load(tmp_path / "narrow" / "onnx" / "model.onnx")
    groups = [a.i for n in graph.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert groups and set(groups) == {3}  # no separate branches: every convolution is grouped by member
    engine = OnnxEnsemble(tmp_path / "narrow" / "onnx" / "model.onnx", model.config)
    x = np.random.default_rng(0).normal(size=(4, *INPUT)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    got = engine(x)
    np.testing.assert_allclose(got["member_probs"], expected.member_probs.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["entropy"], expected.entropy.numpy(), atol=1e-5, rtol=0)
    with running(tmp_path / "narrow", "--name", "narrow", log=tmp_path / "server.log") as server:  # served unchanged
        body = {
            "inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        reply = httpx.post(f"{server.url}/v2/models/narrow/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    probs = next(o for o in reply.json()["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.array(probs["data"]).reshape(4, 10), expected.probs.numpy(), atol=1e-5, rtol=0)


def test_the_packed_graph_quantizes_to_int8_qdq_unchanged(tmp_path: Path) -> None:
    model = narrow_ensemble()
    export_graph(model, tmp_path / "packed.onnx", packed=True)
    pixels = np.random.default_rng(1).normal(size=(16, *INPUT)).astype(np.float32)
    write_int8_graph(tmp_path / "packed.onnx", tmp_path / "packed.int8.onnx", pixels[:8])
    graph = onnx.load(tmp_path / "packed.int8.onnx")
    inits = {t.name for t in graph.graph.initializer}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    float_convs = [n.name for n in convs if n.input[1] in inits]  # the rest take int8 weights, dequantized
    assert len(convs) >= 5 and float_convs == stem_nodes(graph)  # the stem reads the pixels (through a Tile)
    assert len(float_convs) == 1
    int8 = OnnxEnsemble(tmp_path / "packed.int8.onnx", model.config)(pixels[8:])
    with torch.no_grad():
        fp32 = model(torch.from_numpy(pixels[8:])).probs.numpy()
    assert int8["probs"].shape == fp32.shape and np.abs(int8["probs"] - fp32).max() < 0.1


def test_members_at_different_widths_are_refused_by_layer_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slim_ensemble().save_pretrained(tmp_path / "slim")  # UMM kept different channels per member
    assert main(["export", "onnx", str(tmp_path / "slim"), "--packed"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--packed needs every member at the same widths: member 1 has \S+ at \[", err), err
    assert "Traceback" not in err and not (tmp_path / "slim" / "onnx").exists()


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.GroupNorm(2, 4), "GroupNorm"),
        (FrozenBatchNorm2d(4), "FrozenBatchNorm2d"),
        (ScaledStdConv2d(4, 4, 1), "ScaledStdConv2d"),
    ],
)
def test_a_layer_packing_cannot_group_is_refused_by_name(layer: nn.Module, name: str) -> None:
    members = [nn.Sequential(nn.Conv2d(1, 4, 3), copy.deepcopy(layer), nn.Flatten()) for _ in range(2)]
    with pytest.raises(ExportError, match=rf"cannot group layer '1' \({name}, holding"):
        PackedMembers(members, INPUT)


class _MixesMembers(nn.Module):
    """Weights packing can group, but a forward that reads channels across members' blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flip(1).mean((2, 3))  # packed, member 0's outputs read member 1's channels


def test_a_forward_that_mixes_members_is_caught_by_the_check() -> None:
    with pytest.raises(ExportError, match="does not reproduce the members"):
        PackedMembers([_MixesMembers(), _MixesMembers()], INPUT)
