"""Packaging: torch-free import, the package-dir mapping, timm registration, the console script."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import freetickets_hub
import freetickets_hub.model.architectures

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_load_torch() -> None:
    code = "import sys, freetickets_hub; assert 'torch' not in sys.modules; print(freetickets_hub.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == freetickets_hub.__version__


def test_stages_are_mapped_into_one_namespace() -> None:
    import freetickets_hub.export
    import freetickets_hub.model_cards
    import freetickets_hub.training

    assert Path(freetickets_hub.training.__file__).parent == ROOT / "training"
    assert Path(freetickets_hub.export.__file__).parent == ROOT / "export"
    assert Path(freetickets_hub.model_cards.__file__).parent == ROOT / "model_cards"


def test_lazy_names_resolve() -> None:
    assert freetickets_hub.EnsembleModel.__name__ == "EnsembleModel"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = freetickets_hub.Nope


@pytest.mark.parametrize("name", ["cifar_wrn10_2", "cifar_wrn16_4"])
def test_registered_architectures_build_for_28x28_grayscale(name: str) -> None:
    assert name in timm.list_models("cifar_wrn*")
    model = timm.create_model(name, num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert not torch.isnan(out).any(), "Output included NaNs"
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_architecture_defaults_yield_to_model_args() -> None:
    """``model_args`` (``--set model_args={widen_factor: 4}``) override a variant's depth and width, as in timm."""
    narrow = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1)
    wide = timm.create_model("cifar_wrn10_2", num_classes=10, in_chans=1, widen_factor=4)
    assert wide.num_features == 2 * narrow.num_features == 256
    assert wide(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_console_script_is_installed() -> None:
    script = shutil.which("freetickets", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout


def test_every_module_of_the_package_imports() -> None:
    """A module left behind by a move (an import of a path that no longer exists) fails here, by name."""
    import freetickets_hub.export
    import freetickets_hub.training

    packages = [freetickets_hub, freetickets_hub.training, freetickets_hub.export]  # the last two: mapped folders
    names = [
        m.name
        for package in packages
        for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        if not m.name.endswith("__main__") and m.name != "freetickets_hub.export.triton_model"
    ]
    assert {"freetickets_hub.artifact.masks", "freetickets_hub.cli", "freetickets_hub.training.train"} <= set(names)
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:
            failed[name] = repr(err)
    assert failed == {}
