"""The built wheel, as a user installs it: every package listed, every module importable, a verb that runs.

The editable install maps the source folders through a meta-path finder, which hides a package that
``pyproject.toml`` forgets to list. These tests build the real wheel and import it with that finder
out of the way (``python -S`` and a hand-made ``sys.path`` of the wheel plus the dependencies).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest_hub import make_ensemble

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"freetickets_hub.export.triton_model"}  # copied into Triton model repositories as model.py


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under the package-dir roots, by its installed dotted name."""
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    names = set()
    for package, folder in setuptools_cfg["package-dir"].items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            if "__pycache__" not in relative:
                names.add(".".join((package, *relative)))
    return names


def test_every_package_on_disk_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() - listed == set(), "packages missing from [tool.setuptools] packages"
    assert listed - _packages_on_disk() == set(), "listed packages that do not exist"


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline with the environment's setuptools and unpacked into a folder."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("freetickets_hub-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run_from_wheel(site: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with only the wheel and the dependencies' site-packages on the path (no .pth, no finder)."""
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    paths = json.dumps([str(site), *dependencies])
    prelude = f"import sys; sys.path[:0] = {paths}\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code, *args], capture_output=True, text=True, cwd=site.parent
    )


def test_wheel_imports_every_module(wheel_site: Path) -> None:
    modules = sorted(
        ".".join(path.relative_to(wheel_site).with_suffix("").parts).removesuffix(".__init__")
        for path in (wheel_site / "freetickets_hub").rglob("*.py")
        if path.name != "__main__.py"
    )
    assert "freetickets_hub.evaluation.report" in modules
    for template in TEMPLATES:  # shipped, but only Triton's Python backend can import them
        modules.remove(template)
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(wheel_site)!r}), (name, module.__file__)\n"
        "print(len(sys.argv) - 1)\n"
    )
    result = _run_from_wheel(wheel_site, code, *modules)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(modules))


def test_wheel_runs_export_onnx(wheel_site: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    make_ensemble(members=2).save_pretrained(model_dir)
    code = "import sys; from freetickets_hub.cli import main; sys.exit(main(sys.argv[1:]))"
    result = _run_from_wheel(wheel_site, code, "export", "onnx", str(model_dir))
    assert result.returncode == 0, result.stderr
    assert (model_dir / "onnx" / "model.onnx").is_file()
