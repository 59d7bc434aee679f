"""A real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) in a subprocess on loopback ports.

The wheel ships the server binary, its Python backend and one backend stub per CPython version. The
stub for this interpreter is copied beside a copy of the backend (the wheel's own folder is left
untouched), the server's libraries come from ``nvidia_pytriton.libs`` and the stub imports
``freetickets_hub`` and its dependencies from this interpreter's ``sys.path``. Metrics are off; waits are
bounded. ``start_problem`` says why the server cannot run here (the tests then skip with it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import freetickets_hub

from .serve_support import ServerProcess, free_port


def _wheel() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # found, not imported: only its server files are used
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "tritonserver"


def start_problem() -> str | None:
    """None when a Triton server can start here, else why not."""
    wheel = _wheel()
    if wheel is None:
        return "nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0 --no-deps)"
    if not sys.platform.startswith("linux"):
        return f"the nvidia-pytriton server binary runs on Linux only, not {sys.platform}"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (wheel / "python_backend_stubs" / version / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton ships no Python-backend stub for CPython {version}"
    return None


class TritonServer(ServerProcess):
    """``tritonserver --model-repository REPO`` on free HTTP and GRPC ports of 127.0.0.1; ``url`` once ready."""

    name = "tritonserver"

    def __init__(self, repository: Path, *, log: Path, work: Path, env: dict | None = None) -> None:
        wheel = _wheel()
        assert wheel is not None, start_problem()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        backends = work / "backends"
        shutil.copytree(wheel / "backends", backends, dirs_exist_ok=True)
        shutil.copy2(wheel / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
        libs = wheel.parents[1] / "nvidia_pytriton.libs"
        paths = [str(Path(freetickets_hub.__file__).parents[1]), *(p for p in sys.path if p and Path(p).is_dir())]
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.ready_url = f"http://{self.url}/v2/health/ready"
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **(env or {}))
        # this interpreter's libpython first: the stub would otherwise take the system's, whose ABI may
        # not match this interpreter's compiled modules (_ssl of CPython 3.11.7 vs Debian's 3.11.2)
        libdirs = (sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", ""))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libdirs if p)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # the embedded interpreter of the stub finds its prefix (and the venv) from the python on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [
            str(wheel / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={free_port()}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
        ]
        self._launch(command, env, log)


@contextlib.contextmanager
def running_triton(repository: Path, *, log: Path, work: Path) -> Iterator[TritonServer]:
    server = TritonServer(repository, log=log, work=work)
    try:
        yield server.wait_ready(timeout=120.0)
    finally:
        server.stop()
