"""Slow and idle clients (issue 22, item 3): every connection and every shutdown is bounded in time.

Each test runs a ``freetickets serve`` subprocess with short bounds and talks raw HTTP over a
socket, so a connection's silence, a short body or a disconnect is exactly what the test sends.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from pathlib import Path

import httpx
import pytest

from .serve_support import Server, exported_model, running
from .test_serve import counters, json_request, pixels

BOUNDS = ("--name", "m", "--keep-alive-s", "1", "--body-timeout-s", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running(model_dir, *BOUNDS, log=tmp_path_factory.mktemp("timeouts") / "server.log") as srv:
        yield srv


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends on ``sock`` until it closes it, and how long that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def seconds_until_closed(sock: socket.socket, limit: float = 10.0) -> float:
    return read_until_closed(sock, limit)[1]


def infer_header(length: int) -> bytes:
    return (
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def statuses(url: str, status: str) -> float:
    return sum(v for key, v in counters(url).items() if key[0] == "freetickets_requests_total" and key[-1] == status)


def test_a_connection_that_never_sends_a_byte_is_closed_after_keep_alive(server: Server) -> None:
    with connect(server.url) as sock:
        waited = seconds_until_closed(sock)
    assert 0.5 < waited < 4.0, f"closed after {waited:.1f} s with --keep-alive-s 1"


def test_an_idle_connection_after_a_response_is_closed_after_keep_alive(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        waited = seconds_until_closed(sock)
    assert waited < 4.0, f"closed after {waited:.1f} s with --keep-alive-s 1"


def test_a_body_shorter_than_its_content_length_is_408_after_the_body_timeout(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(infer_header(1000) + b'{"inputs": [')
        answer, waited = read_until_closed(sock)  # the 408, then the connection closes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--body-timeout-s" in answer and b"12 bytes came" in answer
    assert 0.5 < waited < 4.0, f"answered after {waited:.1f} s with --body-timeout-s 1"


def test_a_client_leaving_mid_body_is_counted_499_and_never_500(server: Server) -> None:
    before_499, before_500 = statuses(server.url, "499"), statuses(server.url, "500")
    with connect(server.url) as sock:
        sock.sendall(infer_header(1000) + b'{"inputs": [')
        time.sleep(0.2)  # the request has reached the app and waits for the rest of its body
    deadline = time.monotonic() + 10
    while statuses(server.url, "499") == before_499:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert statuses(server.url, "500") == before_500
    assert "Exception in ASGI application" not in server.log.read_text()
    assert httpx.post(f"{server.url}/v2/models/m/infer", content=json_request(pixels(1, 0))).status_code == 200


def test_readiness_is_503_as_soon_as_sigterm_is_handled(model_dir: Path, tmp_path: Path) -> None:
    server = Server(model_dir, "--name", "m", log=tmp_path / "server.log").wait_ready()
    try:
        with httpx.Client() as client:  # an open connection: the probe needs no new accept after the signal
            assert client.get(server.ready_url).status_code == 200
            server.terminate()
            assert client.get(server.ready_url).status_code == 503
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_sigterm_exits_within_the_drain_timeout_even_with_work_still_waiting(model_dir: Path, tmp_path: Path) -> None:
    # the request waits 20 s for companions; at the drain bound (2 s) it is answered 503 and the process exits
    flags = ("--name", "m", "--max-batch-size", "4", "--max-delay-ms", "20000", "--drain-timeout-s", "2")
    server = Server(model_dir, *flags, log=tmp_path / "server.log").wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor() as pool:
            waiting = pool.submit(
                httpx.post, f"{server.url}/v2/models/m/infer", content=json_request(pixels(1, 0)), timeout=30
            )
            deadline = time.monotonic() + 30
            while counters(server.url)[("freetickets_queue_depth",)] != 1:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.02)
            started = time.monotonic()
            server.terminate()
            assert server.process.wait(15) == 0
            elapsed = time.monotonic() - started
            answer = waiting.result(15)
        assert answer.status_code == 503 and "--drain-timeout-s" in answer.json()["error"], answer.text
        assert "Retry-After" in answer.headers
        assert elapsed < 2.0 + 1.5, f"exited {elapsed:.1f} s after SIGTERM with --drain-timeout-s 2"
    finally:
        server.stop()
