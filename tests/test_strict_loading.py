"""Strict, safe loading: every malformed artifact raises one clear error naming the problem; no code runs."""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from freetickets_hub import ArtifactError, ConfigError, EnsembleModel

from .conftest_hub import make_ensemble


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    make_ensemble(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    return tmp_path


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


TENSOR_CASES = {
    "missing": (lambda t: t.pop("members.1.fc.bias"), "tensor 'members.1.fc.bias' is missing from the checkpoint"),
    "extra": (
        lambda t: t.update({"members.3.fc.bias": torch.zeros(10)}),
        r"holds 1 tensor\(s\) this config does not expect, e.g. \['members.3.fc.bias'\]",
    ),
    "mis-shaped dense": (
        lambda t: t.update({"members.0.fc.bias": torch.zeros(11)}),
        r"tensor 'members.0.fc.bias' has shape \(11,\), expected \(10,\)",
    ),
    "mis-shaped values": (
        lambda t: t.update({"members.2.stages.2.0.conv2.weight.values": torch.zeros(3)}),
        r"'members.2.stages.2.0.conv2.weight.values' has shape \(3,\), expected \(\d+,\) "
        r"\(one value per set mask bit\)",
    ),
    "mis-shaped mask": (
        lambda t: t.update({"members.0.stages.2.0.conv2.weight.mask": torch.zeros(7, dtype=torch.uint8)}),
        r"members.0.stages.2.0.conv2.weight.mask: expected a 1-D uint8 tensor of \d+ bytes",
    ),
    "half a sparse pair": (
        lambda t: t.pop("members.0.stages.1.0.conv1.weight.values"),
        r"tensor 'members.0.stages.1.0.conv1.weight.values' is missing \(its sparse counterpart is present\)",
    ),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensors_raise_artifact_error_naming_them(case: str, copy: Path) -> None:
    edit, message = TENSOR_CASES[case]
    _edit_tensors(copy, edit)
    with pytest.raises(ArtifactError, match=message):
        EnsembleModel.from_pretrained(copy)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value

    return edit


CONFIG_CASES = {
    "format_version": (_set("ensemble.format_version", 3), "ensemble.format_version 3 is not supported"),
    "num_classes type": (_set("num_classes", "10"), "num_classes must be of type int, got '10'"),
    "sparsity type": (_set("ensemble.sparsity", "0.8"), "ensemble.sparsity must be of type int or float, got '0.8'"),
    "members type": (_set("ensemble.num_members", 3.0), "ensemble.num_members must be of type int, got 3.0"),
    "model_args type": (_set("model_args", ["in_chans", 1]), "model_args must be of type dict"),
    "sparsity 1": (_set("ensemble.sparsity", 1.0), r"ensemble.sparsity must be in \[0, 1\), got 1.0"),
    "sparsity negative": (_set("ensemble.sparsity", -0.1), r"ensemble.sparsity must be in \[0, 1\), got -0.1"),
    "zero members": (_set("ensemble.num_members", 0), "ensemble.num_members must be at least 1, got 0"),
    "label count": (_set("label_names", ["a"] * 9), "label_names has 9 entries but num_classes is 10"),
    "missing key": (lambda c: c.pop("architecture"), "config is missing the required key 'architecture'"),
    "architecture": (_set("architecture", "no_such_net"), "cannot build architecture 'no_such_net'"),
    "model_args key": (_set("model_args", {"in_chans": 1, "wings": 2}), "cannot build architecture 'cifar_wrn10_2'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_configs_raise_config_error_naming_the_value(case: str, copy: Path) -> None:
    edit, message = CONFIG_CASES[case]
    _edit_config(copy, edit)
    with pytest.raises(ConfigError, match=message):
        EnsembleModel.from_pretrained(copy)


def test_config_that_is_not_json_raises_config_error(copy: Path) -> None:
    (copy / "config.json").write_text('{"architecture": "cifar_wrn10_2",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        EnsembleModel.from_pretrained(copy)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_raise_artifact_error(keep: float, copy: Path) -> None:
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(
        ArtifactError, match=r"cannot read .*model.safetensors: .*\(is the file truncated or corrupt\?\)"
    ):
        EnsembleModel.from_pretrained(copy)


def test_only_safetensors_is_read_never_a_pickle(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    EnsembleModel.from_pretrained(copy)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        EnsembleModel.from_pretrained(copy)


def test_loading_never_executes_code_from_the_folder(copy: Path) -> None:
    marker = copy / "executed"
    for name in ("handler.py", "__init__.py", "modeling.py"):
        (copy / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    before = set(sys.modules)
    EnsembleModel.from_pretrained(copy)
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - before if m in ("handler", "modeling")}
