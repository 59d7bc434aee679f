"""Save / load round trips, the Hub cache layout with HF_HUB_OFFLINE, predict, companions and handler.py."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

import freetickets_hub
from freetickets_hub import EnsembleModel
from freetickets_hub.engines.preprocessing import preprocess

from .conftest_hub import INPUT, LABELS, make_ensemble, put_in_hub_cache

ARTIFACT_FILES = {"README.md", "config.json", "handler.py", "model.safetensors", "requirements.txt"}
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def model() -> EnsembleModel:
    return make_ensemble(seed=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(5, *INPUT, generator=torch.Generator().manual_seed(1))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_save_load_round_trip_is_exact(model: EnsembleModel, pixels: torch.Tensor, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "saved")
    assert _files(tmp_path / "saved") == ARTIFACT_FILES
    loaded = EnsembleModel.from_pretrained(tmp_path / "saved")
    assert loaded.source_dir == tmp_path / "saved" and loaded.values_dtype == "float32"
    assert not loaded.training
    assert torch.equal(loaded(pixels).probs, model(pixels).probs)
    for mine, theirs in zip(model.masks, loaded.masks, strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (
        tmp_path / "saved" / "requirements.txt"
    ).read_text() == f"freetickets-hub[torch]>={freetickets_hub.__version__}\n"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_values_are_smaller_close_and_kept_on_resave(
    dtype: str, model: EnsembleModel, pixels: torch.Tensor, tmp_path: Path
) -> None:
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "half", values_dtype=dtype)
    full, half = (tmp_path / d / "model.safetensors" for d in ("fp32", "half"))
    assert half.stat().st_size < 0.7 * full.stat().st_size
    loaded = EnsembleModel.from_pretrained(tmp_path / "half")
    assert loaded.values_dtype == dtype
    torch.testing.assert_close(loaded(pixels).probs, model(pixels).probs, atol=2e-2, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # the loaded dtype is the default: no silent growth back to fp32
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == half.stat().st_size


def test_unknown_values_dtype_is_refused(model: EnsembleModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"values_dtype must be one of .* got 'int8'"):
        model.save_pretrained(tmp_path, values_dtype="int8")
    assert not (tmp_path / "model.safetensors").exists()


def test_load_by_repo_id_from_offline_cache_with_pinned_revision(
    model: EnsembleModel, pixels: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    model.save_pretrained(tmp_path / "a")
    other = make_ensemble(seed=5)
    other.save_pretrained(tmp_path / "b")
    put_in_hub_cache(tmp_path / "a", cache, "org/tiny-edst", COMMIT_A)
    put_in_hub_cache(tmp_path / "b", cache, "org/tiny-edst", COMMIT_B, main=False)

    main = EnsembleModel.from_pretrained("org/tiny-edst", cache_dir=cache)
    assert main.source_dir == cache / "models--org--tiny-edst" / "snapshots" / COMMIT_A
    assert torch.equal(main(pixels).probs, model(pixels).probs)
    pinned = EnsembleModel.from_pretrained("org/tiny-edst", revision=COMMIT_B, cache_dir=cache)
    assert torch.equal(pinned(pixels).probs, other(pixels).probs)
    with pytest.raises(FileNotFoundError, match=f"'org/absent' .* not in the Hub cache {cache}; HF_HUB_OFFLINE=1"):
        EnsembleModel.from_pretrained("org/absent", cache_dir=cache)


def test_hf_hub_offline_environment_is_honoured(model: EnsembleModel, pixels: torch.Tensor, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "a")
    put_in_hub_cache(tmp_path / "a", tmp_path / "home" / "hub", "org/tiny-edst", COMMIT_A)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    code = (
        "import sys, numpy, torch; from freetickets_hub import EnsembleModel\n"
        "m = EnsembleModel.from_pretrained('org/tiny-edst', revision=sys.argv[1])\n"
        "print(m(torch.from_numpy(numpy.load(sys.argv[2]))).probs.argmax(-1).tolist())\n"
        "try:\n    EnsembleModel.from_pretrained('org/absent')\nexcept Exception as e:\n    print(type(e).__name__)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-c", code, COMMIT_A, str(tmp_path / "pixels.npy")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    predicted, error = result.stdout.strip().splitlines()
    assert json.loads(predicted) == model(pixels).probs.argmax(-1).tolist()
    assert error == "ModelNotFoundError"


def test_downloads_are_tagged_with_library_name_and_version(
    model: EnsembleModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.save_pretrained(tmp_path / "repo")
    calls = []

    def fake_download(*, repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return str(tmp_path / "repo" / filename)

    monkeypatch.setattr("freetickets_hub.artifact.hub.hf_hub_download", fake_download)
    EnsembleModel.from_pretrained("org/name", revision="v1", token="t", local_files_only=True)
    assert [c["filename"] for c in calls] == ["config.json", "model.safetensors"]
    for call in calls:
        assert call["library_name"] == "freetickets-hub"
        assert call["library_version"] == freetickets_hub.__version__
        assert (call["repo_id"], call["revision"], call["token"], call["local_files_only"]) == (
            "org/name",
            "v1",
            "t",
            True,
        )


def test_predict_accepts_pil_arrays_and_paths_in_batches(model: EnsembleModel, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(5)]
    Image.fromarray(arrays[0]).save(tmp_path / "0.png")
    inputs = [tmp_path / "0.png", str(tmp_path / "0.png"), Image.fromarray(arrays[1]), arrays[2], arrays[3][..., None]]
    expected_arrays = [arrays[0], arrays[0], arrays[1], arrays[2], arrays[3]]
    predictions = model.predict(inputs, batch_size=2)
    with torch.inference_mode():
        pixels = torch.from_numpy(preprocess(expected_arrays, model.config.pretrained_cfg))
        reference = model(pixels)
    np.testing.assert_allclose(predictions.probs, reference.probs.numpy(), atol=1e-6)
    np.testing.assert_allclose(predictions.mutual_information, reference.mutual_information.numpy(), atol=1e-6)
    assert predictions.labels == [LABELS[i] for i in reference.probs.argmax(-1).tolist()]
    assert predictions.probs.shape == (5, 10) and predictions.entropy.shape == (5,)
    single = model.predict(arrays[2])
    np.testing.assert_allclose(single.probs[0], predictions.probs[3], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_preprocessing_matches_timm_transform(channels: int) -> None:
    cfg = {
        "input_size": [channels, 28, 28] if channels == 1 else [3, 32, 32],
        "mean": [0.2860] * channels,
        "std": [0.3530] * channels,
        "crop_pct": 1.0 if channels == 1 else 0.875,
        "interpolation": "bilinear" if channels == 1 else "bicubic",
    }
    image = Image.fromarray(np.random.default_rng(channels).integers(0, 256, (36, 40, 3), dtype=np.uint8))  # 40x36
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=cfg))
    expected = transform(image.convert("L" if channels == 1 else "RGB")).numpy()
    np.testing.assert_allclose(preprocess(image, cfg)[0], expected, atol=1e-6, rtol=0)


def _with_companions(model: EnsembleModel, folder: Path) -> None:
    model.save_pretrained(folder)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"graph")
    (folder / "onnx" / "model.onnx.data").write_bytes(b"weights")
    (folder / "onnx" / "stray.pt").write_bytes(b"pickle")
    (folder / "assets").mkdir()
    (folder / "assets" / "reliability.png").write_bytes(b"png")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "optimizer.bin").write_bytes(b"pickle")


COMPANIONS = {"onnx/model.onnx", "onnx/model.onnx.data", "assets/reliability.png"}


def test_companions_follow_an_unchanged_model_only(
    model: EnsembleModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _with_companions(model, tmp_path / "run")
    loaded = EnsembleModel.from_pretrained(tmp_path / "run")
    loaded.save_pretrained(tmp_path / "copy")
    assert _files(tmp_path / "copy") == ARTIFACT_FILES | COMPANIONS  # never the pickle or the checkpoints
    assert "![assets/reliability.png](assets/reliability.png)" in (tmp_path / "copy" / "README.md").read_text()

    loaded.set_temperature(1.5, fit_on="validation")
    with caplog.at_level(logging.WARNING, logger="freetickets_hub.model.ensemble"):
        loaded.save_pretrained(tmp_path / "changed")
    assert _files(tmp_path / "changed") == ARTIFACT_FILES
    assert "the ensemble changed since it was loaded" in caplog.text

    loaded.save_pretrained(tmp_path / "forced", extras_from=tmp_path / "run")
    assert _files(tmp_path / "forced") == ARTIFACT_FILES | COMPANIONS


def test_saving_in_place_keeps_companions_and_warns_when_they_go_stale(
    model: EnsembleModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _with_companions(model, tmp_path / "run")
    loaded = EnsembleModel.from_pretrained(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="freetickets_hub.model.ensemble"):
        loaded.save_pretrained(tmp_path / "run")
        assert not caplog.text
        loaded.set_temperature(2.0, fit_on="validation")
        loaded.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "onnx" / "model.onnx").read_bytes() == b"graph"
    assert "describe the weights being replaced there" in caplog.text


def _load_handler(folder: Path) -> type:
    spec = importlib.util.spec_from_file_location("endpoint_handler_under_test", folder / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler


def test_endpoint_handler_from_saved_folder(model: EnsembleModel, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "repo")
    handler = _load_handler(tmp_path / "repo")(str(tmp_path / "repo"))
    array = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = model.predict(array)

    answer = handler({"inputs": image, "parameters": {"top_k": 3}})
    assert [a["label"] for a in answer] == [LABELS[i] for i in np.argsort(-expected.probs[0])[:3]]
    assert answer[0]["score"] == pytest.approx(float(expected.probs[0].max()), abs=1e-6)
    assert answer[0]["mutual_information"] == pytest.approx(float(expected.mutual_information[0]), abs=1e-6)
    assert {"entropy", "expected_entropy", "disagreement"} <= answer[0].keys()
    for encoded in (buffer.getvalue(), base64.b64encode(buffer.getvalue()).decode()):
        assert handler({"inputs": encoded}) == handler({"inputs": image})
    assert len(handler({"inputs": [image, buffer.getvalue()]})) == 2
    with pytest.raises(ValueError, match="not valid base64"):
        handler({"inputs": "not an image!"})
    with pytest.raises(ValueError, match="expected a request with an 'inputs' image"):
        handler({"image": image})
