"""Run the service under uvicorn, with a graceful SIGTERM: readiness 503, in-flight requests finish, exit 0.

``--workers N`` starts N uvicorn worker processes on one listening socket (uvicorn's own
supervisor); each loads the model, batches its own requests and drains on SIGTERM, which the
supervisor forwards to every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

from .errors import ServerBusy
from .service import SETTINGS_ENV, ServeSettings, Service

__all__ = ["drain_on_sigterm", "run_server"]

logger = logging.getLogger(__name__)
_GRACE_S = 1  # uvicorn's own grace for connections still open once the drain has ended


def drain_on_sigterm(service: Service) -> asyncio.Task[None] | None:
    """Replace uvicorn's SIGTERM handler by a drain; call from the app's startup, in the main thread.

    uvicorn's own SIGTERM closes the listening socket at once and re-raises the signal after
    shutdown (exit status -15). Here SIGTERM marks the service draining: readiness answers 503 and
    new work gets 503 + Retry-After while queued and in-flight requests finish (at most
    ``drain_timeout_s``); then uvicorn shuts down as usual and the process exits 0. The task also
    stops the server when the model failed to load. Returns None outside a uvicorn server.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)  # uvicorn.Server.handle_exit
    if not isinstance(server, uvicorn.Server):
        return None
    loop = asyncio.get_running_loop()
    requested = asyncio.Event()

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if service.failure is None:
            service.begin_drain()  # readiness 503 from now on (the handler runs on the loop's thread)
        loop.call_soon_threadsafe(requested.set)

    signal.signal(signal.SIGTERM, on_sigterm)

    async def supervise() -> None:
        while not requested.is_set() and service.failure is None:
            await asyncio.sleep(0.05)
        if service.failure is None:
            service.begin_drain()
            deadline = loop.time() + max(0.0, service.settings.drain_timeout_s - _GRACE_S)
            while not service.idle and loop.time() < deadline:
                await asyncio.sleep(0.02)
            if service.batcher is not None:  # answered 503 now rather than cancelled (a 500) at uvicorn's exit
                refused = service.batcher.refuse_queued(
                    ServerBusy(
                        "the server shut down before this request's turn (--drain-timeout-s); retry on another replica"
                    )
                )
                if refused:
                    logger.warning("drain bound reached: %d queued image(s) refused with 503", refused)
        server.should_exit = True

    return loop.create_task(supervise(), name="drain-on-sigterm")


def run_server(settings: ServeSettings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown, 1 when the model failed to load."""
    os.environ[SETTINGS_ENV] = settings.to_env()  # each worker's app_from_env reads it
    config = uvicorn.Config(
        "freetickets_hub.serving.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        proxy_headers=False,
        access_log=False,
        log_level="info",
        http="freetickets_hub.serving.http_protocol:IdleBoundedProtocol",  # a silent new connection closes too
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=_GRACE_S,  # after the drain: the whole shutdown stays within --drain-timeout-s
    )
    print(f"serving {settings.name} ({settings.backend}) on http://{settings.host}:{settings.port}", flush=True)
    if settings.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    uvicorn.Server(config).run()
    service = getattr(config.loaded_app, "service", None)
    return 1 if service is not None and service.failure is not None else 0
