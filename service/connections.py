"""uvicorn's HTTP protocol with the two answers that must not wait for the app: 408 for headers
that stall, 503 at the admission door.

Headers: uvicorn arms no timer until a connection's first response, so a client that opens a
connection and sends part of its headers holds it (and a file descriptor) forever. This protocol
gives a request's headers `header_timeout_s` from the connection opening, or from the request's
first byte on a kept-alive connection, then answers 408 and closes. The body has its own deadline
in the ASGI layer (middleware.RequestGuard), where a 408 can use the normal response path.

The door: past capacity most requests are refused (three of every four at four times capacity),
so a refusal must cost next to nothing, or turning clients away eats the capacity it protects.
Once the headers of a POST /classify are in, `door()` (Admission.door: no lock, an estimate) is
asked; a refused request's body is discarded as it arrives (never parsed, never tokenized) and,
once it is in, the 503 is written to the socket from here: no ASGI task, no middleware. Not
before the body is in: a client still sending it when the answer comes may stop halfway and
reuse the connection (aiohttp does), and the next request would be read as the rest of the body.
The connection then serves the client's next request. A body that stalls gets 408 and a closed
connection after `body_timeout_s`, as in the body guard; a client waiting for 100 Continue gets
the 503 at once and the connection closed. A request pipelined behind one still being answered goes the normal way (its
answer must not overtake the earlier one); Admission.admit asks the same door again there.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from romebert.service.errors import error_body
from romebert.service.metrics import Metrics
from romebert.service.routes import CLASSIFY
from romebert.service.tickets import Rejected

CLASSIFY_BYTES = CLASSIFY.encode()


def raw_error(status: str, code: str, message: str, headers: list[tuple[bytes, bytes]], close: bool) -> bytes:
    """A whole HTTP/1.1 error response in the API's error shape (ErrorResponse)."""
    body = json.dumps(error_body(code, message), ensure_ascii=False, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def serving_protocol(header_timeout_s: float, body_timeout_s: float, door: Callable[[], Rejected | None],
                     metrics: Metrics) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol class with the header deadline and the admission door (whose refused
    requests' bodies get `body_timeout_s`, as the body guard gives the others)."""

    class ServingProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None  # the headers' deadline, then a refused request's body's
        _refusal: Rejected | None = None  # refused at the door, answered when its body is in
        _refused_since = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm(header_timeout_s)

        def on_headers_complete(self) -> None:
            self._disarm()
            refused = self._refused_at_door()
            if refused is None:
                super().on_headers_complete()
                return
            self._refused_since = time.perf_counter()
            self.cycle = self._answered_cycle()  # uvicorn's parser drops the body of an answered request
            if self.expect_100_continue:  # no body comes before a 100 Continue, which will not come: close
                self._refuse(refused, keep_alive=False)
            else:  # answer once the body is in: a client may drop a body it is still sending when the answer comes first
                self._refusal = refused
                self._arm(body_timeout_s)

        def on_message_complete(self) -> None:
            refused, self._refusal = self._refusal, None
            if refused is None:
                super().on_message_complete()
                return
            self._disarm()
            self._refuse(refused, keep_alive=self.parser.should_keep_alive())

        def _refuse(self, refused: Rejected, keep_alive: bool) -> None:
            self.transport.write(raw_error(
                "503 Service Unavailable", refused.code, str(refused),
                [*self.server_state.default_headers, (b"retry-after", refused.retry_after.encode())], close=not keep_alive))
            metrics.responded(503, time.perf_counter() - self._refused_since)
            self.cycle.keep_alive = keep_alive
            if keep_alive:
                self.on_response_complete()
            else:
                self.transport.close()

        def _refused_at_door(self) -> Rejected | None:
            if self.parser.get_method() != b"POST" or httptools.parse_url(self.url).path != CLASSIFY_BYTES:
                return None
            if self.cycle is not None and not self.cycle.response_complete:  # pipelined behind an unfinished answer
                return None
            return door()

        def _answered_cycle(self) -> RequestResponseCycle:
            """A cycle whose response is complete: the parser's body callbacks then drop the body."""
            cycle = RequestResponseCycle(
                scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger, access_logger=self.access_logger,
                access_log=False, default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=False, on_response=self.on_response_complete,
            )
            cycle.response_complete = True
            return cycle

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, timeout_s: float) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expire, timeout_s)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self, timeout_s: float) -> None:
            self._header_timer = None
            part = "headers" if self._refusal is None else "body"
            if self._refusal is not None:
                self._refusal = None
                metrics.responded(408, time.perf_counter() - self._refused_since)
            if not self.transport.is_closing():
                self.transport.write(raw_error("408 Request Timeout", "request_timeout",
                                               f"the request {part} did not arrive within {timeout_s:g} s", [], close=True))
                self.transport.close()

    return ServingProtocol

