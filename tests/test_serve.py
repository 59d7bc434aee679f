"""``freetickets serve`` over HTTP: a server subprocess (torch blocked in it) talked to by real clients.

Open Inference Protocol v2 through ``tritonclient`` (binary, JSON, aio), ``/v1/predict`` (multipart,
base64), every bad-input class with its status, batching identity under concurrency, metrics
counters, 413 before the body is read, and the torch backend.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from freetickets_hub.cli import main
from freetickets_hub.engines.onnxruntime import OnnxEnsemble
from freetickets_hub.engines.preprocessing import preprocess

from .conftest_hub import put_in_hub_cache
from .serve_support import LABEL_NAMES, exported_model, running, torch_blocker

NAME = "fmnist"
MAX_BATCH = 16
FLAGS = ("--name", NAME, "--max-batch-size", str(MAX_BATCH), "--max-delay-ms", "20", "--max-body-mb", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> OnnxEnsemble:
    return OnnxEnsemble.from_pretrained(model_dir, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    blocker = torch_blocker(tmp_path_factory)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running(model_dir, *FLAGS, log=log, pythonpath=blocker) as srv:
        yield srv


def pixels(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 1, 28, 28)).astype(np.float32)


def png(seed: int, size: int = 28) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def counters(url: str) -> dict[tuple[str, ...], float]:
    """Every sample of /metrics, by (name, *label values)."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, *s.labels.values()): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def v2_infer(url: str, body: bytes, headers: dict[str, str] | None = None, name: str = NAME) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers or {}, timeout=30)


def json_request(array: np.ndarray, **overrides: Any) -> bytes:
    tensor = {"name": "pixel_values", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    tensor.update(overrides)
    return json.dumps({"inputs": [tensor]}).encode()


# --- the Open Inference Protocol through tritonclient ---------------------------------------------------------


def test_health_and_metadata_through_tritonclient(server) -> None:
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata(NAME)
    assert meta["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes == {
        "logits": [-1, 10],
        "probs": [-1, 10],
        "member_probs": [3, -1, 10],
        "entropy": [-1],
        "expected_entropy": [-1],
        "mutual_information": [-1],
        "disagreement": [-1],
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_outputs_equal_a_direct_call(server, engine: OnnxEnsemble, binary: bool) -> None:
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    x = pixels(5, seed=1)
    tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    expected = engine(x)
    result = client.infer(NAME, [tensor], outputs=[triton_http.InferRequestedOutput(n, binary) for n in expected])
    for name, value in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=0, atol=1e-6, err_msg=name)
    chosen = client.infer(NAME, [tensor], outputs=[triton_http.InferRequestedOutput("entropy", binary)])
    assert [o["name"] for o in chosen.get_response()["outputs"]] == ["entropy"]
    default = client.infer(NAME, [tensor], request_id="r-7")  # no outputs named: all of them, binary
    assert default.get_response()["id"] == "r-7"
    np.testing.assert_allclose(default.as_numpy("member_probs"), expected["member_probs"], rtol=0, atol=1e-6)


def test_aio_client_sends_json_as_octet_stream(server, engine: OnnxEnsemble) -> None:
    x = pixels(2, seed=2)

    async def call() -> np.ndarray:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            tensor = triton_aio.InferInput("pixel_values", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=False)
            out = [triton_aio.InferRequestedOutput("probs", binary_data=False)]
            return (await client.infer(NAME, [tensor], outputs=out)).as_numpy("probs")
        finally:
            await client.close()

    np.testing.assert_allclose(asyncio.run(call()), engine(x)["probs"], rtol=0, atol=1e-6)
    body = json_request(x)  # the same body by hand, declared as octet-stream
    reply = v2_infer(server.url, body, {"Content-Type": "application/octet-stream"})
    assert reply.status_code == 200 and reply.json()["outputs"][0]["name"] == "logits"


def test_concurrent_clients_are_batched_and_get_their_own_rows(server, engine: OnnxEnsemble) -> None:
    before = counters(server.url)
    sizes = [1, 3, 2, 4, 1, 2, 3, 1, 4, 2, 1, 3]
    inputs = [pixels(n, seed=100 + i) for i, n in enumerate(sizes)]
    results: dict[int, dict[str, np.ndarray]] = {}
    start = threading.Barrier(len(sizes))

    def client(i: int) -> None:
        conn = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        tensor = triton_http.InferInput("pixel_values", list(inputs[i].shape), "FP32")
        tensor.set_data_from_numpy(inputs[i])
        start.wait(10)
        reply = conn.infer(NAME, [tensor])
        results[i] = {name: reply.as_numpy(name) for name in ("probs", "member_probs", "entropy", "disagreement")}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(sizes)
    for i, x in enumerate(inputs):
        alone = engine(x)  # the same images, unbatched
        for name, value in results[i].items():
            np.testing.assert_allclose(value, alone[name], rtol=0, atol=1e-6, err_msg=f"request {i} {name}")
    after = counters(server.url)
    batches = after[("freetickets_batch_size_count",)] - before[("freetickets_batch_size_count",)]
    images = after[("freetickets_batch_size_sum",)] - before[("freetickets_batch_size_sum",)]
    assert images == sum(sizes)
    assert batches < len(sizes), "no two requests shared an engine call"


def test_the_readme_client_code_runs_against_the_server(server, engine: OnnxEnsemble) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The same client for this server and Triton", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"127.0.0.1:8000"', repr(server.url.removeprefix("http://"))).replace('"demo"', repr(NAME))
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    expected = engine(np.zeros((4, 1, 28, 28), np.float32))
    np.testing.assert_allclose(namespace["probs"], expected["probs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(namespace["epistemic"], expected["mutual_information"], rtol=0, atol=1e-6)


# --- /v1/predict ----------------------------------------------------------------------------------------------


def expected_records(engine: OnnxEnsemble, blobs: list[bytes], top_k: int) -> list[dict[str, Any]]:
    images = [Image.open(io.BytesIO(b)) for b in blobs]
    rows = engine.predict(images).to_records(top_k=top_k)
    member_probs = engine(preprocess(images, engine.config.pretrained_cfg))["member_probs"]
    for b, row in enumerate(rows):
        row["member_votes"] = [LABEL_NAMES[k] for k in member_probs[:, b].argmax(-1)]
    return rows


def assert_records_match(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e["label"] and g["label_id"] == e["label_id"]
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        for key in ("confidence", "entropy", "expected_entropy", "mutual_information", "disagreement"):
            assert g[key] == pytest.approx(e[key], abs=1e-6), key
        assert [v["label"] for v in g["member_votes"]] == e["member_votes"]
        assert "abstain" not in g  # this model carries no selective-prediction calibration


def test_predict_multipart_files(server, engine: OnnxEnsemble) -> None:
    blobs = [png(1), png(2, size=40)]
    files = [("files", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    reply = httpx.post(f"{server.url}/v1/predict", params={"top_k": 3}, files=files, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == NAME
    got = reply.json()["predictions"]
    assert all(len(row["top_k"]) == 3 for row in got)
    assert_records_match(got, expected_records(engine, blobs, 3))


def test_predict_base64_json(server, engine: OnnxEnsemble) -> None:
    blobs = [png(3), png(4)]
    images = [base64.b64encode(blobs[0]).decode(), "data:image/png;base64," + base64.b64encode(blobs[1]).decode()]
    reply = httpx.post(f"{server.url}/v1/predict", json={"images": images}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert_records_match(reply.json()["predictions"], expected_records(engine, blobs, 5))


def test_metadata_names_the_model_and_its_runtime(server) -> None:
    meta = httpx.get(f"{server.url}/v1/metadata").json()
    assert meta["name"] == NAME and meta["labels"] == LABEL_NAMES and meta["members"] == 3
    assert meta["sparsity"] == 0.8 and meta["temperature"] == pytest.approx(1.2)
    assert meta["calibration"]["fit_on"] == "test" and meta["selective"] is None
    assert meta["backend"] == "onnx" and meta["providers"] == ["CPUExecutionProvider"]
    assert "onnxruntime" in meta["versions"] and "torch" not in meta["versions"]
    assert meta["batching"] == {"max_batch_size": MAX_BATCH, "max_delay_ms": 20.0, "max_queue": 256}
    assert httpx.get(f"{server.url}/docs").status_code == 404  # Swagger UI loads from a CDN: off
    assert "/v1/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_the_server_process_cannot_import_torch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The blocker the server runs under really blocks torch (so the tests above ran torch-free)."""
    env = {"PYTHONPATH": str(torch_blocker(tmp_path_factory))}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr


# --- bad input: a clear 4xx, never a 500 ----------------------------------------------------------------------

GOOD = pixels(2, seed=9)
BINARY_HEADER = json.dumps(
    {"inputs": [{"name": "pixel_values", "shape": [2, 1, 28, 28], "datatype": "FP32",
                 "parameters": {"binary_data_size": GOOD.nbytes}}]}
).encode()  # fmt: skip
NAN = GOOD.copy()
NAN[0, 0, 0, 0] = np.nan

V2_CASES = {
    "unknown model": (NAME + "x", json_request(GOOD), {}, 404, "unknown model 'fmnistx'"),
    "unknown input name": (NAME, json_request(GOOD, name="images"), {}, 400, "takes one input 'pixel_values'"),
    "wrong shape": (NAME, json_request(pixels(1, 0)[:, :, :20], shape=[1, 1, 20, 28]), {}, 400, "must have shape"),
    "wrong rank": (NAME, json_request(GOOD, shape=[2, 784]), {}, 400, "must have shape ['B', 1, 28, 28]"),
    "wrong datatype": (NAME, json_request(GOOD, datatype="FP64"), {}, 400, "must have datatype FP32, got 'FP64'"),
    "batch over the limit": (NAME, json_request(pixels(MAX_BATCH + 1, 0)), {}, 400, "batch 17; this server takes"),
    "empty batch": (NAME, json_request(pixels(1, 0)[:0], shape=[0, 1, 28, 28]), {}, 400, "batch 0"),
    "too few values": (NAME, json_request(GOOD, data=[0.0] * 10), {}, 400, "needs 1568 values, got 10"),
    "strings as data": (NAME, json_request(GOOD, data=["a"] * 1568), {}, 400, "must hold only numbers"),
    "no inputs": (NAME, b'{"inputs": []}', {}, 400, "needs 'inputs'"),
    "not JSON": (NAME, b"\x00\xffgarbage", {}, 400, "must be a JSON inference request"),
    "binary size mismatch": (
        NAME, BINARY_HEADER + GOOD.tobytes()[:-4], {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
        400, "needs binary_data_size 6272",
    ),
    "bad header length": (NAME, json_request(GOOD), {"Inference-Header-Content-Length": "x"}, 400, "an integer"),
    "header length past the body": (
        NAME, json_request(GOOD), {"Inference-Header-Content-Length": "99999999"}, 400, "but the body has",
    ),
    "NaN": (
        NAME, BINARY_HEADER + NAN.tobytes(), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
        400, "1 NaN or infinite",
    ),
    "unknown output": (
        NAME, json.dumps({**json.loads(json_request(GOOD)), "outputs": [{"name": "nope"}]}).encode(), {},
        400, "unknown output 'nope'",
    ),
    "compressed body": (NAME, json_request(GOOD), {"Content-Encoding": "gzip"}, 400, "not supported"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(V2_CASES))
def test_bad_v2_requests(server, case: str) -> None:
    name, body, headers, status, message = V2_CASES[case]
    reply = v2_infer(server.url, body, headers, name=name)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_unknown_models_and_versions_are_404(server) -> None:
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{NAME}/versions/2", "/nowhere"):
        reply = httpx.get(server.url + path)
        assert reply.status_code == 404 and reply.json()["error"], path
    assert httpx.get(f"{server.url}/v2/models/{NAME}/versions/1/ready").status_code == 200


TRUNCATED = png(5)[:60]
V1_CASES = {
    "undecodable image": ({"files": [("files", ("a.png", b"not an image", "image/png"))]}, "12 bytes: not a PNG"),
    "truncated image": ({"files": [("files", ("t.png", TRUNCATED, "image/png"))]}, "a broken or truncated image"),
    "empty file": ({"files": [("files", ("e.png", b"", "image/png"))]}, "is empty"),
    "no files field": ({"files": [("image", ("a.png", png(1), "image/png"))]}, "multipart field 'files'"),
    "text field as files": ({"data": {"files": "hello"}, "files": [("x", ("a", b"1"))]}, "text field"),
    "too many files": ({"files": [("files", (f"{i}.png", png(1), "image/png")) for i in range(17)]}, "limit is 16"),
    "bad base64": ({"json": {"images": ["%%%"]}}, "images[0] is not valid base64"),
    "a URL is never fetched": ({"json": {"images": ["http://127.0.0.1:9/a.png"]}}, "images[0] is not valid base64"),
    "base64 of a non-image": ({"json": {"images": [base64.b64encode(b"hello").decode()]}}, "not a PNG, JPEG"),
    "JSON without images": ({"json": {"image": "x"}}, '{"images": ['),
    "JSON not an object": ({"json": [1, 2]}, '{"images": ['),
    "broken JSON": ({"content": b"{", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
    "wrong content type": ({"content": b"abc", "headers": {"Content-Type": "text/plain"}}, "unsupported Content-Type"),
    "top_k zero": ({"params": {"top_k": "0"}, "json": {"images": []}}, "top_k must be an integer from 1 to 10"),
    "top_k too large": ({"params": {"top_k": "11"}, "json": {"images": []}}, "got '11'"),
    "top_k not a number": ({"params": {"top_k": "two"}, "json": {"images": []}}, "got 'two'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(V1_CASES))
def test_bad_predict_requests(server, case: str) -> None:
    reply = httpx.post(f"{server.url}/v1/predict", timeout=30, **V1_CASES[case][0])
    assert reply.status_code == 400, reply.text
    assert V1_CASES[case][1] in reply.json()["error"]


def test_body_over_the_limit_is_413_before_it_is_read(server) -> None:
    big = b"0" * (1024 * 1024 + 1)
    declared = v2_infer(server.url, big, {"Content-Type": "application/octet-stream"})
    assert declared.status_code == 413 and "at most 1048576" in declared.json()["error"]

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(40):
            yield b"0" * 65536

    streamed = httpx.post(f"{server.url}/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200  # and the server carries on


def test_metrics_count_exactly_the_requests_sent(server) -> None:
    before = counters(server.url)
    for _ in range(3):
        assert v2_infer(server.url, json_request(GOOD)).status_code == 200
    for _ in range(2):
        assert v2_infer(server.url, json_request(GOOD, datatype="INT8")).status_code == 400
    assert httpx.post(f"{server.url}/v1/predict", files=[("files", ("a.png", png(1)))]).status_code == 200
    assert v2_infer(server.url, json_request(GOOD), name="other").status_code == 404
    after = counters(server.url)

    def delta(*key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    infer = "/v2/models/{name}/infer"
    assert delta("freetickets_requests_total", infer, "200") == 3
    assert delta("freetickets_requests_total", infer, "400") == 2
    assert delta("freetickets_requests_total", infer, "404") == 1
    assert delta("freetickets_requests_total", "/v1/predict", "200") == 1
    assert delta("freetickets_request_latency_seconds_count", infer) == 6
    assert delta("freetickets_queue_latency_seconds_count") == 4  # the requests that reached the batcher
    assert delta("freetickets_images_total") == 3 * 2 + 1
    assert delta("freetickets_abstentions_total") == 0
    assert ("freetickets_queue_depth",) in after and ("freetickets_compute_latency_seconds_count",) in after


# --- command line ---------------------------------------------------------------------------------------------


def test_model_without_a_graph_names_the_export_command(tmp_path: Path, model_dir: Path, capsys) -> None:
    (tmp_path / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no onnx/model.onnx: run `freetickets export onnx" in err and "--backend torch" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["serve", str(model_dir), "--max-queue", "4"]) == 2
    assert "--max-queue (4) must be at least --max-batch-size (32)" in capsys.readouterr().err


def test_hub_id_is_served_from_the_offline_cache(model_dir: Path, engine: OnnxEnsemble, tmp_path: Path) -> None:
    put_in_hub_cache(model_dir, tmp_path / "hf" / "hub", "freetickets/fmnist-edst", "a" * 40)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    x = pixels(2, seed=6)
    with running("freetickets/fmnist-edst", log=tmp_path / "hub.log", env=env) as srv:
        reply = v2_infer(srv.url, json_request(x), name="fmnist-edst")  # NAME defaults to the id's last part
    assert reply.status_code == 200, reply.text
    probs = next(o for o in reply.json()["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), engine(x)["probs"], rtol=0, atol=1e-6)


NASTY = [
    (b"", {}),
    (b"null", {}),
    (b'{"inputs": {"name": "pixel_values"}}', {}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [[1], [2, 3]]}]}', {}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [1e9, 1, 28, 28], "datatype": "FP32", "data": []}]}', {}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [true, 1, 28, 28], "datatype": "FP32", "data": []}]}', {}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [1, 1, 28, 28], "datatype": "FP32", "parameters": []}]}', {}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [1, 1, 28, 28], "datatype": "FP32",'
     b' "parameters": {"binary_data_size": "3136"}}]}' + bytes(3136), {"Inference-Header-Content-Length": "103"}),
    (b'{"inputs": [{"name": "pixel_values", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0]}],'
     b' "outputs": [{"name": ["probs"]}], "parameters": 5}', {}),
    (bytes(range(256)) * 8, {"Inference-Header-Content-Length": "2"}),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "0"}),
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(NASTY)))
def test_no_input_makes_a_500(server, index: int) -> None:
    body, headers = NASTY[index]
    reply = v2_infer(server.url, body, headers)
    assert 400 <= reply.status_code < 500 and reply.json()["error"], reply.text


def test_torch_backend_serves_the_same_outputs(model_dir: Path, engine: OnnxEnsemble, tmp_path: Path) -> None:
    x = pixels(3, seed=4)
    with running(model_dir, "--backend", "torch", log=tmp_path / "torch.log") as srv:
        reply = v2_infer(srv.url, json_request(x), name=model_dir.name)
        assert httpx.get(f"{srv.url}/v1/metadata").json()["backend"] == "torch"
    assert reply.status_code == 200, reply.text
    got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}
    for name, value in engine(x).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)  # fp32 torch vs ORT


def test_openvino_backend_serves_the_same_outputs_without_torch(
    model_dir: Path, engine: OnnxEnsemble, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("openvino")
    x = pixels(3, seed=6)
    blocker = torch_blocker(tmp_path_factory)
    with running(model_dir, "--backend", "openvino", log=tmp_path / "openvino.log", pythonpath=blocker) as srv:
        reply = v2_infer(srv.url, json_request(x), name=model_dir.name)
        meta = httpx.get(f"{srv.url}/v1/metadata").json()
    assert reply.status_code == 200, reply.text
    assert meta["backend"] == "openvino" and meta["providers"][0].startswith("OpenVINO CPU ")
    tolerance = 3e-2 if meta["providers"][0].endswith("bf16") else 1e-4  # bf16 keeps about three digits
    got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}
    assert set(got) == set(engine(x))
    for name, value in engine(x).items():
        np.testing.assert_allclose(got[name], value, rtol=tolerance, atol=tolerance, err_msg=name)


def test_a_stored_selective_rule_reaches_predict_metadata_and_metrics(
    model_dir: Path, engine: OnnxEnsemble, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import shutil

    blobs = [png(seed) for seed in range(20, 28)]
    confidence = engine.predict([Image.open(io.BytesIO(b)) for b in blobs]).confidence
    folder = tmp_path / "selective"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["ensemble"]["selective"] = {  # answer only the more confident half; sets of about half the labels
        "n": 1000, "fit_on": "synthetic", "score": "confidence", "threshold": float(np.median(confidence)),
        "target_risk": 0.1, "delta": 0.1, "calibration_coverage": 0.5, "calibration_risk": 0.05,
        "conformal_alpha": 0.1, "conformal_score": "lac", "conformal_quantile": 0.9,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    expected = OnnxEnsemble.from_pretrained(folder, providers=["CPUExecutionProvider"])
    want = expected.predict([Image.open(io.BytesIO(b)) for b in blobs]).to_records()
    assert 0 < sum(r["abstain"] for r in want) < len(want)  # the rule really splits these images
    log = tmp_path / "server.log"
    with running(folder, *FLAGS, log=log, pythonpath=torch_blocker(tmp_path_factory)) as srv:
        files = [("files", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        reply = httpx.post(f"{srv.url}/v1/predict", files=files, timeout=30)
        assert reply.status_code == 200, reply.text
        got = reply.json()["predictions"]
        assert [r["abstain"] for r in got] == [r["abstain"] for r in want]
        assert [r["prediction_set"] for r in got] == [r["prediction_set"] for r in want]
        assert httpx.get(f"{srv.url}/v1/metadata").json()["selective"]["threshold"] == pytest.approx(
            config["ensemble"]["selective"]["threshold"]
        )
        assert counters(srv.url)[("freetickets_abstentions_total",)] == sum(r["abstain"] for r in want)
