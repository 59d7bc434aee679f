"""The ``--backend python`` repository on a real ``tritonserver``, answering as ``freetickets serve`` does.

One Triton server (from the ``nvidia-pytriton`` wheel) loads two exports of the same ensemble, which
carries a selective-prediction rule: ``demo`` (the defaults) and ``tiny_queue`` (``--max-queue 1``).
One ``freetickets serve`` runs the same folder. Both are asked with the README's ``tritonclient``
code. Skips, with the reason, where the server binary cannot run.
"""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from freetickets_hub.cli import main
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import preprocess

from .serve_support import LABEL_NAMES, exported_model, running
from .triton_server import running_triton, start_problem

pytestmark = pytest.mark.skipif(start_problem() is not None, reason=f"no Triton server here: {start_problem()}")

NAME = "demo"
GRAPH_OUTPUTS = ("logits", "probs", "entropy", "expected_entropy", "mutual_information", "disagreement")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving tests' ensemble with a selective rule whose threshold and quantile split these images."""
    folder = tmp_path_factory.mktemp("triton") / NAME
    shutil.copytree(exported_model(tmp_path_factory), folder)
    outputs = OnnxEnsemble.from_pretrained(folder)(preprocess(images(16), _pretrained_cfg(folder)))
    config = json.loads((folder / "config.json").read_text())
    config["ensemble"]["selective"] = {
        "n": 100, "fit_on": "test", "score": "entropy", "threshold": float(np.median(outputs["entropy"])),
        "target_risk": 0.1, "delta": 0.1, "calibration_coverage": 0.5, "calibration_risk": 0.05,
        "conformal_alpha": 0.1, "conformal_score": "lac", "conformal_quantile": 0.9,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _pretrained_cfg(folder: Path) -> Any:
    from freetickets_hub.artifact.config import EnsembleConfig

    return EnsembleConfig.from_json_file(str(folder / "config.json")).pretrained_cfg


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def repository(model_dir: Path) -> Path:
    repo = model_dir.parent / "model_repository"
    common = ["export", "triton", str(model_dir), "--output-dir", str(repo), "--backend", "python", "--kind", "cpu"]
    assert main([*common, "--name", NAME, "--max-batch-size", "32", "--max-delay-ms", "20"]) == 0
    assert main([*common, "--name", "tiny_queue", "--max-batch-size", "8", "--max-queue", "1"]) == 0
    return repo


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("tritonserver")
    with running_triton(repository, log=work / "tritonserver.log", work=work) as server:
        yield server


@pytest.fixture(scope="module")
def serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running(model_dir, "--name", NAME, "--max-batch-size", "32", log=log) as server:
        yield server


def readme_client(url: str) -> dict[str, Any]:
    """Run the README's client block against ``url``; its variables."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The same client for this server and Triton", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace('"127.0.0.1:8000"', repr(url))
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def infer(url: str, pixels: np.ndarray, names: tuple[str, ...], *, binary: bool, name: str = NAME) -> dict:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = client.infer(name, [tensor], outputs=outputs)
    return {n: result.as_numpy(n).reshape(len(pixels), -1) for n in names}  # Triton: (B, 1) per image


def test_triton_loads_the_python_repository(triton) -> None:
    client = httpclient.InferenceServerClient(triton.url)
    assert client.is_model_ready(NAME) and client.is_model_ready("tiny_queue")
    meta = client.get_model_metadata(NAME)
    assert meta["platform"] == "" or "python" in json.dumps(meta)
    assert [i["name"] for i in meta["inputs"]] == ["pixel_values"]
    assert {o["name"] for o in meta["outputs"]} == {*GRAPH_OUTPUTS, "abstain", "prediction_set"}


def test_the_readme_client_gets_the_same_answers_from_both(triton, serve) -> None:
    ours = readme_client(serve.url.removeprefix("http://"))
    theirs = readme_client(triton.url)
    np.testing.assert_allclose(theirs["probs"], ours["probs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(theirs["epistemic"], ours["epistemic"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_outputs_and_labels_equal_ours(triton, serve, model_dir: Path, binary: bool) -> None:
    pixels = preprocess(images(6), _pretrained_cfg(model_dir))
    ours = infer(serve.url.removeprefix("http://"), pixels, GRAPH_OUTPUTS, binary=binary)
    theirs = infer(triton.url, pixels, GRAPH_OUTPUTS, binary=binary)
    for name in GRAPH_OUTPUTS:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=0, atol=1e-6, err_msg=name)
    # Triton's classification extension labels probs from labels.txt; ours labels /v1/predict rows
    client = httpclient.InferenceServerClient(triton.url)
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    top1 = client.infer(NAME, [tensor], outputs=[httpclient.InferRequestedOutput("probs", class_count=1)])
    triton_labels = [row[0].decode().split(":")[2] for row in top1.as_numpy("probs")]
    assert triton_labels == [LABEL_NAMES[k] for k in ours["probs"].argmax(-1)]
    assert triton_labels == [row["label"] for row in predict_v1(serve.url)]


def predict_v1(url: str) -> list[dict[str, Any]]:
    files = []
    for i, image in enumerate(images(6)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(("files", (f"{i}.png", buffer.getvalue(), "image/png")))
    reply = httpx.post(f"{url}/v1/predict", files=files, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["predictions"]


def test_selective_outputs_agree(triton, serve, model_dir: Path) -> None:
    rows = predict_v1(serve.url)
    pixels = preprocess(images(6), _pretrained_cfg(model_dir))
    theirs = infer(triton.url, pixels, ("abstain", "prediction_set"), binary=True)
    assert [bool(a) for a in theirs["abstain"][:, 0]] == [row["abstain"] for row in rows]
    assert any(row["abstain"] for row in rows) and not all(row["abstain"] for row in rows)  # the rule splits them
    sets = [[LABEL_NAMES[k] for k in np.flatnonzero(members)] for members in theirs["prediction_set"]]
    assert sets == [sorted(row["prediction_set"]) for row in rows]  # ours ranks by probability; Triton: membership


def _batch_stats(url: str, name: str) -> dict[int, int]:
    stats = httpx.get(f"http://{url}/v2/models/{name}/stats", timeout=10).json()["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_the_dynamic_batcher_forms_batches(triton, model_dir: Path) -> None:
    before = _batch_stats(triton.url, NAME)
    pixels = preprocess(images(1), _pretrained_cfg(model_dir))
    with ThreadPoolExecutor(16) as pool:  # 64 one-image requests, 16 at a time, 20 ms to fill a batch
        list(pool.map(lambda _: infer(triton.url, pixels, ("probs",), binary=True), range(64)))
    after = _batch_stats(triton.url, NAME)
    formed = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
    assert sum(size * count for size, count in formed.items()) == 64
    assert max(formed) > 1, f"no batch of more than one request: {formed}"


def test_the_queue_policy_rejects_a_burst(triton, model_dir: Path) -> None:
    pixels = preprocess(images(8), _pretrained_cfg(model_dir))

    def call(_: int) -> str:
        try:
            infer(triton.url, pixels, ("probs",), binary=True, name="tiny_queue")
        except InferenceServerException as err:
            return str(err)
        return "ok"

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(64)))
    rejected = [a for a in answers if a != "ok"]
    assert rejected and all("Exceeds maximum queue size" in a for a in rejected), set(answers)
    assert "ok" in answers
