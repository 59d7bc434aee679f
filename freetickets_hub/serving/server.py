"""Run the service under uvicorn, with a graceful SIGTERM: readiness 503, in-flight requests finish, exit 0.

``--workers N`` starts N uvicorn worker processes on one listening socket (uvicorn's own
supervisor); each loads the model and batches its own requests, and each drains on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

from .service import SETTINGS_ENV, ServeSettings

__all__ = ["DrainingServer", "run_server"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose SIGTERM drains: the app stops being ready, then the server exits when idle.

    uvicorn's own SIGTERM closes the listening socket at once and re-raises the signal after
    shutdown (exit status -15). Here SIGTERM only marks the service draining: readiness answers
    503 and new work gets 503 + Retry-After while queued and in-flight requests finish (at most
    ``drain_timeout_s``); then uvicorn shuts down as usual and the process exits 0. SIGINT keeps
    uvicorn's behaviour.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_since is None:
            self._drain_since = time.monotonic()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        service = getattr(self.config.loaded_app, "service", None)  # the ServingApp gate (proxy headers off)
        if service is None:
            return False
        if service.failure is not None:
            return True
        if self._drain_since is None:
            return False
        service.begin_drain()
        timeout = service.settings.drain_timeout_s
        return service.idle or time.monotonic() - self._drain_since > timeout

    @property
    def failed(self) -> bool:
        service = getattr(self.config.loaded_app, "service", None)
        return service is not None and service.failure is not None


def run_server(settings: ServeSettings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown, 1 when the model failed to load."""
    os.environ[SETTINGS_ENV] = settings.to_env()
    config = uvicorn.Config(
        "freetickets_hub.serving.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        proxy_headers=False,  # keeps our gate the outermost app (DrainingServer finds the service on it)
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
    )
    server = DrainingServer(config)
    print(f"serving {settings.name} ({settings.backend}) on http://{settings.host}:{settings.port}", flush=True)
    if settings.workers == 1:
        server.run()
        return 1 if server.failed else 0
    socket = config.bind_socket()
    Multiprocess(config, target=server.run, sockets=[socket]).run()
    return 0
