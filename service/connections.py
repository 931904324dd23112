"""Connections that stall before their headers are complete: uvicorn's protocol, with a deadline.

uvicorn arms no timer until a connection's first response, so a client that opens a connection
and sends part of its headers holds it (and a file descriptor) forever. This protocol gives a
request's headers `timeout_s` from the connection opening, or from the request's first byte on a
kept-alive connection, then answers 408 in the usual error shape and closes. The body has its own
deadline in the ASGI layer (middleware.RequestGuard), where a 408 can use the normal response path.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout", "message": f"the request headers did not arrive within {timeout_s:g} s",
                                 "details": None}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def protocol_with_header_timeout(timeout_s: float) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol class whose requests must complete their headers within timeout_s."""
    response = _timeout_response(timeout_s)

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return HeaderDeadlineProtocol
