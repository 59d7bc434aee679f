"""``OpenVinoEnsemble``: the exported graphs on OpenVINO, torch-free, checked against ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from freetickets_hub import OnnxEnsemble
from freetickets_hub.engines.preprocessing import preprocess
from freetickets_hub.errors import ArtifactError
from freetickets_hub.export.verify import synthetic_images
from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES

from .test_onnx_export import make_ensemble

ov = pytest.importorskip("openvino")
from freetickets_hub.engines.openvino import OpenVinoEnsemble  # noqa: E402

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """A compact export, check pixels and ONNX Runtime's float32 outputs on them."""
    folder = tmp_path_factory.mktemp("ov")
    model = make_ensemble()
    model.set_temperature(1.3, fit_on="test")
    model.save_pretrained(folder)
    from freetickets_hub.export import export_onnx

    export_onnx(model, folder)
    cfg = model.config.pretrained_cfg
    pixels = preprocess(synthetic_images(cfg, 16, seed=4), cfg)
    return folder, pixels, OnnxEnsemble.from_pretrained(folder)(pixels)


def test_f32_matches_onnx_runtime_on_every_output(exported: tuple[Path, np.ndarray, dict]) -> None:
    folder, pixels, reference = exported
    engine = OpenVinoEnsemble.from_pretrained(folder, precision="f32")
    graph = json.loads((folder / "onnx" / "export_report.json").read_text())
    assert graph["compact"] and engine.folded_weights >= 15  # the bit-mask weights were rebuilt before compiling
    assert engine.providers == ["OpenVINO CPU f32"] and engine.output_names == list(OUTPUT_NAMES)
    outputs = engine(pixels)
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(outputs[name], reference[name], rtol=0, atol=1e-5, err_msg=name)
    assert engine(pixels[:1])["probs"].shape == (1, 10)  # dynamic batch
    predictions = engine.predict(synthetic_images(engine.config.pretrained_cfg, 3, seed=1))
    assert len(predictions) == 3


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 units")
def test_bf16_is_the_default_and_close_to_float32(exported: tuple[Path, np.ndarray, dict]) -> None:
    folder, pixels, reference = exported
    engine = OpenVinoEnsemble.from_pretrained(folder)
    assert engine.precision == "bf16"
    outputs = engine(pixels)
    assert np.abs(outputs["probs"] - reference["probs"]).max() < 2e-2
    assert np.abs(outputs["probs"] - reference["probs"]).max() > 0  # really a lower precision
    np.testing.assert_allclose(outputs["probs"].sum(1), 1.0, atol=1e-4)


def test_checks_against_config_and_arguments(exported: tuple[Path, np.ndarray, dict], tmp_path: Path) -> None:
    folder, pixels, _ = exported
    engine = OpenVinoEnsemble.from_pretrained(folder, precision="f32")
    config = engine.config.to_dict()
    config["ensemble"]["calibration"]["temperature"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes((folder / "onnx" / "model.onnx").read_bytes())
    with pytest.raises(ArtifactError, match=r"exported with temperature 1\.3"):
        OpenVinoEnsemble.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVinoEnsemble.from_pretrained(folder, precision="int4")
    with pytest.raises(ValueError, match="must be float32"):
        engine(pixels.astype(np.float64))
    with pytest.raises(FileNotFoundError, match=r"model\.int8\.onnx"):
        OpenVinoEnsemble.from_pretrained(folder, variant="int8")


def test_import_needs_no_torch() -> None:
    code = "import sys, freetickets_hub.engines.openvino; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
