"""The ASGI application: both dialects on one FastAPI app, behind a gate that bounds bodies and counts requests.

``create_app(settings)`` builds it; ``app_from_env`` is the factory each ``--workers`` process calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from freetickets_hub import __version__

from . import v1, v2
from .errors import PayloadTooLarge, RequestTimeout, ServingError
from .metrics import route_template
from .server import drain_on_sigterm
from .service import ServeSettings, Service

__all__ = ["ServingApp", "app_from_env", "create_app"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_PROBES = ("/v2/health/live", "/v2/health/ready", "/metrics")  # not counted as in-flight work when draining
_WORK = ("/v2/models/{name}/infer", "/v1/predict")  # routes that queue images


class ServingApp:
    """The outermost ASGI layer: refuses bodies over the limit, tracks in-flight requests, counts every answer.

    A declared ``Content-Length`` over the limit is answered 413 without reading the body; a body
    without one (chunked) is counted while it streams and refused as soon as it passes the limit.
    While no request would be admitted (``MicroBatcher.has_room``: the queue limit, and while shedding
    the wait budget), work is refused here with 503 + ``Retry-After``, before routing: under
    an overload, refusals must cost next to nothing. Every response, including these, is counted in
    ``freetickets_requests_total{route,status}``.
    """

    def __init__(self, app: FastAPI, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(scope["path"])
        started = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if scope["method"] == "HEAD":  # every GET route answers HEAD: its headers, no body
            scope = {**scope, "method": "GET"}
            send_counted = _headers_only(send_counted)
        limit = self.service.settings.max_body_bytes
        counts = route not in _PROBES
        self.service.in_flight += counts
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _reply_error(send_counted, PayloadTooLarge(_too_large(declared, limit)))
                return
            batcher = self.service.batcher
            if route in _WORK and batcher is not None and not batcher.has_room():
                await _reply_error(send_counted, batcher.refuse())
                return
            await self.app(scope, _bounded(receive, limit, self.service.settings.body_timeout_s), send_counted)
        except ClientDisconnect:  # the client left before sending its whole body: nothing to answer
            status = 499
            logger.info("client disconnected during %s %s", scope["method"], scope["path"])
        finally:
            self.service.in_flight -= counts
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(settings: ServeSettings) -> ServingApp:
    """The service for ``settings``: the model loads in the background once the server starts."""
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        supervisor = drain_on_sigterm(service)
        yield
        if supervisor is not None:
            supervisor.cancel()
        await service.stop()

    app = FastAPI(
        title="FreeTickets Hub",
        version=__version__,
        summary=f"Uncertainty-aware predictions of {service.name}: /v1/predict and the Open Inference Protocol v2",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,  # Swagger UI and ReDoc load from a CDN: blank offline
        redoc_url="/redoc" if settings.docs else None,  # /openapi.json is always served
    )
    app.state.service = service
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return ServingApp(app, service)


def app_from_env() -> ServingApp:
    """``create_app`` with the settings the parent process put in the environment (one call per worker)."""
    return create_app(ServeSettings.from_env())


async def _serving_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ServingError)
    return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)


async def _http_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


async def _validation_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": problems}, status_code=400)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server has already refused a malformed one
    return None


def _too_large(size: int, limit: int) -> str:
    return f"the body is {size} bytes or more; this server takes at most {limit} (--max-body-mb {limit / 2**20:g})"


def _bounded(receive: Receive, limit: int, timeout_s: float) -> Receive:
    """``receive`` that raises ``PayloadTooLarge`` as soon as the body streamed so far passes ``limit``,
    and ``RequestTimeout`` when the body is not whole ``timeout_s`` after the request began."""
    received = 0
    complete = False
    deadline = time.monotonic() + timeout_s

    async def bounded() -> Message:
        nonlocal received, complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise RequestTimeout(
                f"the body did not arrive within {timeout_s:g} s (--body-timeout-s); {received} bytes came"
            ) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(_too_large(received, limit))
        return message

    return bounded


def _headers_only(send: Send) -> Send:
    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only


async def _reply_error(send: Send, err: ServingError) -> None:
    body = json.dumps({"error": str(err)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in err.headers.items()]
    if isinstance(err, (PayloadTooLarge, RequestTimeout)):
        headers.append((b"connection", b"close"))  # the unread body would follow on this connection
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
