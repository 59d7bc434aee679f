"""Helpers of the serving tests: one exported ensemble per session, servers in subprocesses on free ports.

Every server runs ``python -m freetickets_hub.cli serve`` on 127.0.0.1 with a free port; waits are
bounded. ``TORCH_BLOCKER`` makes ``import torch`` (and the training / export packages) fail in the
server process, so the onnx backend is shown to run without them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

LABEL_NAMES = [f"class_{i}" for i in range(10)]
_BLOCKER = """
import importlib.abc, sys
_BLOCKED = ("torch", "timm", "freetickets_hub.training", "freetickets_hub.export")

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
            raise ImportError(f"{name} is blocked in this test: the onnx serving path must not import it")
        return None

sys.meta_path.insert(0, _Block())
"""


def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Fashion-MNIST-shaped ensemble (WRN-10-2, M=3, 80 % sparse) saved with its ONNX graph, once per session."""
    folder = tmp_path_factory.getbasetemp() / "serve_model"
    if (folder / "onnx" / "model.onnx").is_file():
        return folder
    from freetickets_hub.export import export_onnx

    from .test_onnx_export import make_ensemble

    model = make_ensemble(seed=5)
    model.config.label_names = list(LABEL_NAMES)
    model.set_temperature(1.2, fit_on="test")
    model.save_pretrained(folder)
    export_onnx(model, folder, batch_sizes=(1, 4))
    return folder


def torch_blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ``sitecustomize.py`` blocks torch; put it on PYTHONPATH."""
    folder = tmp_path_factory.getbasetemp() / "block_torch"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1 logging to a file, ready once ``ready_url`` answers 200."""

    name = "server"
    ready_url = ""

    def _launch(self, command: list[str], env: dict, log: Path) -> None:
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


class Server(ServerProcess):
    """A ``freetickets serve`` subprocess; ``url`` once ready."""

    def __init__(
        self, model: Path | str, *flags: str, pythonpath: Path | None = None, log: Path, env: dict | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_url = f"{self.url}/v2/health/ready"
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **(env or {}))
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        command = [sys.executable, "-m", "freetickets_hub.cli", "serve", str(model), "--port", str(self.port), *flags]
        self._launch(command, env, log)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def running(
    model: Path | str, *flags: str, log: Path, pythonpath: Path | None = None, env: dict | None = None
) -> Iterator[Server]:
    server = Server(model, *flags, pythonpath=pythonpath, log=log, env=env)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
