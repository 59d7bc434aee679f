"""Backpressure and lifecycle of a server subprocess: 503 + Retry-After on a full queue, SIGTERM drain, workers."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from .serve_support import Server, exported_model, running
from .test_serve import counters, json_request, pixels

# a batch fills at 4 images; a request of 3 waits up to 5 s for companions; 4 images may wait in all
SLOW = ("--name", "m", "--max-batch-size", "4", "--max-queue", "4", "--max-delay-ms", "5000")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory)


def infer(url: str, batch: int, seed: int = 0) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/m/infer", content=json_request(pixels(batch, seed)), timeout=30)


def wait_for_queue(url: str, images: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while counters(url)[("freetickets_queue_depth",)] != images:
        assert time.monotonic() < deadline, f"the queue never held {images} images"
        time.sleep(0.02)


def test_full_queue_answers_503_with_retry_after_at_once(model_dir: Path, tmp_path: Path) -> None:
    with running(model_dir, *SLOW, log=tmp_path / "server.log") as srv, concurrent.futures.ThreadPoolExecutor() as pool:
        waiting = pool.submit(infer, srv.url, 3)  # waits for a fourth image
        wait_for_queue(srv.url, 3)
        started = time.monotonic()
        refused = infer(srv.url, 2)  # 3 + 2 > 4
        elapsed = time.monotonic() - started
        assert refused.status_code == 503 and "the queue is full" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert elapsed < 2.0, f"the refusal took {elapsed:.2f} s (the queued request waits 5 s)"
        assert waiting.result(30).status_code == 200  # the queued request is served
        assert infer(srv.url, 2).status_code == 200  # and the server answers normally afterwards


def test_sigterm_turns_readiness_503_drains_and_exits_0(model_dir: Path, tmp_path: Path) -> None:
    server = Server(model_dir, *SLOW, log=tmp_path / "server.log").wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor() as pool:
            in_flight = pool.submit(infer, server.url, 1)  # waits up to 5 s for companions
            wait_for_queue(server.url, 1)
            server.terminate()
            deadline = time.monotonic() + 15
            while httpx.get(f"{server.url}/v2/health/ready").status_code != 503:
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.02)
            late = infer(server.url, 1)
            assert late.status_code == 503 and "shutting down" in late.json()["error"] and "Retry-After" in late.headers
            assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
            assert in_flight.result(30).status_code == 200  # finished, not dropped
        assert server.process.wait(30) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_workers_each_load_the_model_and_drain(model_dir: Path, tmp_path: Path) -> None:
    server = Server(model_dir, "--name", "m", "--workers", "2", log=tmp_path / "server.log").wait_ready()
    try:
        pids = set()
        for seed in range(40):  # a new connection each time: the kernel hands them to either worker
            assert infer(server.url, 2, seed).status_code == 200
            pids.add(httpx.get(f"{server.url}/v1/metadata").json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, "every request reached the same worker"
        server.terminate()
        assert server.process.wait(60) == 0
    finally:
        server.stop()
