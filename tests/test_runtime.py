"""OnnxEnsemble: torch-free ONNX Runtime engine with EnsembleModel's outputs, providers and input checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from freetickets_hub.engines import onnxruntime as runtime
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.errors import ArtifactError, MissingDependencyError
from freetickets_hub.export import export_onnx
from freetickets_hub.export.verify import synthetic_images
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES

from .test_onnx_export import make_ensemble

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleModel, Path]:
    """A calibrated ensemble saved with its exported graph."""
    folder = tmp_path_factory.mktemp("ensemble")
    model = make_ensemble(seed=2)
    model.set_temperature(1.3, fit_on="test")
    model.save_pretrained(folder)
    export_onnx(model, folder)
    return model, folder


@pytest.fixture(scope="module")
def engine(saved: tuple[EnsembleModel, Path]) -> OnnxEnsemble:
    return OnnxEnsemble.from_pretrained(saved[1], providers=["CPUExecutionProvider"])


def test_predict_matches_ensemble_model(saved: tuple[EnsembleModel, Path], engine: OnnxEnsemble) -> None:
    model, _ = saved
    images = synthetic_images(model.config.pretrained_cfg, 7, seed=11)
    got, expected = engine.predict(images, batch_size=3), model.predict(images)
    assert got.labels == expected.labels
    np.testing.assert_array_equal(got.label_ids, expected.label_ids)
    for field in ("confidence", "probs", "entropy", "expected_entropy", "mutual_information", "disagreement"):
        np.testing.assert_allclose(getattr(got, field), getattr(expected, field), rtol=0, atol=1e-5, err_msg=field)


def test_call_returns_the_design_outputs(engine: OnnxEnsemble) -> None:
    outputs = engine(np.zeros((2, 1, 28, 28), np.float32))
    assert tuple(outputs) == OUTPUT_NAMES
    assert outputs["probs"].shape == (2, 10) and outputs["member_probs"].shape == (3, 2, 10)
    assert outputs["entropy"].shape == outputs["disagreement"].shape == (2,)
    assert engine.input_shape == (1, 28, 28) and engine.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("pixels", "error", "match"),
    [
        (np.zeros((1, 28, 28), np.float32), ValueError, r"4 dimensions \(B, 1, 28, 28\), got shape \(1, 28, 28\)"),
        (np.zeros((2, 3, 28, 28), np.float32), ValueError, "has 3 channels, expected 1"),
        (np.zeros((2, 1, 32, 32), np.float32), ValueError, "height x width 32x32, expected 28x28"),
        (np.zeros((2, 1, 28, 28), np.float64), ValueError, "must be float32, got float64"),
        (np.zeros((2, 1, 28, 28), np.uint8), ValueError, "must be float32, got uint8"),
        (np.zeros((0, 1, 28, 28), np.float32), ValueError, "empty batch"),
        (np.full((2, 1, 28, 28), np.nan, np.float32), ValueError, "1568 NaN or infinite"),
        (np.full((1, 1, 28, 28), np.inf, np.float32), ValueError, "784 NaN or infinite"),
        ([[0.0]], TypeError, "must be a numpy array, got list"),
    ],
)
def test_bad_input_gets_a_clear_error(engine: OnnxEnsemble, pixels: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        engine(pixels)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where no CUDA provider exists")
def test_gpu_provider_without_gpu_is_an_error(saved: tuple[EnsembleModel, Path]) -> None:
    with pytest.raises(
        MissingDependencyError, match=r"\['CUDAExecutionProvider'\] are not available.*allow_cpu_fallback"
    ):
        OnnxEnsemble.from_pretrained(saved[1], providers=["CUDAExecutionProvider"])
    engine = OnnxEnsemble.from_pretrained(saved[1], providers=["CUDAExecutionProvider"], allow_cpu_fallback=True)
    assert engine.providers == ["CPUExecutionProvider"]
    assert engine(np.zeros((1, 1, 28, 28), np.float32))["probs"].shape == (1, 10)


@pytest.mark.skipif(HAS_CUDA, reason="simulates a CUDA provider that is installed but cannot start")
def test_provider_that_does_not_start_is_an_error(
    saved: tuple[EnsembleModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning), pytest.raises(MissingDependencyError, match="are not active in the session"):
        OnnxEnsemble.from_pretrained(saved[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_default_providers_prefer_gpus_in_order() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider"]
    assert runtime._select_providers(available, None, False) == (list(runtime.DEFAULT_PROVIDERS), [])
    assert runtime._select_providers(["CPUExecutionProvider"], None, False) == (["CPUExecutionProvider"], [])


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (this machine has none)")
def test_cuda_provider_with_io_binding(saved: tuple[EnsembleModel, Path], engine: OnnxEnsemble) -> None:
    gpu = OnnxEnsemble.from_pretrained(saved[1], providers=["CUDAExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu._io_device == "cuda"
    images = synthetic_images(saved[0].config.pretrained_cfg, 5, seed=5)
    np.testing.assert_allclose(gpu.predict(images).probs, engine.predict(images).probs, rtol=0, atol=1e-4)


def test_missing_onnxruntime_names_the_extra(
    saved: tuple[EnsembleModel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert not runtime.has_onnxruntime()
    with pytest.raises(MissingDependencyError, match=r"pip install 'freetickets-hub\[onnx\]'"):
        OnnxEnsemble.from_pretrained(saved[1])


def test_graph_older_than_the_calibration_is_refused(saved: tuple[EnsembleModel, Path], tmp_path: Path) -> None:
    shutil.copytree(saved[1], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ensemble"]["calibration"]["temperature"] = 2.0  # re-calibrated, graph not re-exported
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"exported with temperature 1\.3, but config\.json has 2\.0"):
        OnnxEnsemble.from_pretrained(tmp_path)


def test_fetches_only_the_files_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def record(repo: str, filename: str, **kwargs: object) -> Path:
        fetched.append(filename)
        return Path(repo) / filename

    monkeypatch.setattr(runtime, "resolve_file", record)
    export_onnx(make_ensemble(seed=3), tmp_path, external_data=True)
    OnnxEnsemble.from_pretrained(str(tmp_path))
    assert fetched == ["config.json", "onnx/model.onnx", "onnx/model.onnx.data"]


def _cache_snapshot(hf_home: Path, repo_id: str, folder: Path, files: list[str]) -> None:
    """Lay ``files`` of ``folder`` out as huggingface_hub's cache does: blobs, symlinked snapshot, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for name in files:
        blob = repo / "blobs" / name.replace("/", "_")
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, blob)
        link = repo / "snapshots" / SNAPSHOT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


def test_offline_hub_load_without_torch(saved: tuple[EnsembleModel, Path], tmp_path: Path) -> None:
    model, folder = saved
    _cache_snapshot(tmp_path, "org/tiny-edst", folder, ["config.json", "onnx/model.onnx"])  # no model.safetensors
    images = synthetic_images(model.config.pretrained_cfg, 3, seed=4)
    np.save(tmp_path / "images.npy", np.stack([np.asarray(image) for image in images]))
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import freetickets_hub
        from freetickets_hub.engines.onnxruntime import OnnxEnsemble
        assert "torch" not in sys.modules, "importing the runtime imported torch"
        engine = freetickets_hub.OnnxEnsemble.from_pretrained("org/tiny-edst")
        predictions = engine.predict(list(np.load(sys.argv[1])))
        assert "torch" not in sys.modules, "running the runtime imported torch"
        print(" ".join(predictions.labels))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == model.predict(images).labels
