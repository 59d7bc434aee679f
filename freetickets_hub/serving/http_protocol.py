"""uvicorn's HTTP protocol, closing a connection that stays silent from its start for ``--keep-alive-s``.

uvicorn arms its keep-alive timer only after a response, so a client that connects and never
sends a byte holds its connection (and a file descriptor) forever. Here the same timer also runs
from ``connection_made``; any byte received cancels it, as uvicorn already does between requests.
The class follows uvicorn's ``auto`` choice: httptools when installed, else h11.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = ["IdleBoundedProtocol"]


class IdleBoundedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """``AutoHTTPProtocol`` whose keep-alive timer also bounds a new connection's silence."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
