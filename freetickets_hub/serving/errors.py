"""The failures a request can meet, each carrying the HTTP status it becomes (as KServe's ``errors.py``).

One handler in ``app.py`` turns any of them into ``{"error": "..."}``, the body ``tritonclient``
reads its error message from.
"""

from __future__ import annotations

__all__ = [
    "InvalidInput",
    "ModelNotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServerBusy",
    "ServerNotReady",
    "ServingError",
]


class ServingError(Exception):
    """Base: ``status`` is the HTTP status code, ``headers`` extra response headers."""

    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class InvalidInput(ServingError, ValueError):
    """400: undecodable image, wrong tensor name / shape / datatype, a batch over the limit, a bad parameter."""

    status = 400


class ModelNotFound(ServingError, KeyError):
    """404: the path names a model (or version) this server does not serve."""

    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RequestTimeout(ServingError):
    """408: the body did not arrive whole within ``--body-timeout-s`` (a client slower than it declared)."""

    status = 408


class PayloadTooLarge(ServingError):
    """413: the body is over ``--max-body-mb``; raised before the body has been read whole."""

    status = 413


class ServerBusy(ServingError):
    """503 with ``Retry-After``: the batching queue is full, or the server is draining for shutdown."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ServerNotReady(ServingError):
    """503: the model is not loaded and warmed up yet, or the server is shutting down."""

    status = 503
