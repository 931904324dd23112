"""Two pure ASGI middlewares: the request-body limit and the /classify request metrics.

Pure ASGI (not BaseHTTPMiddleware) because both need the raw message stream: the body limit
counts the bytes actually received, not only what Content-Length claims, and the metrics need the
status of every response, including the ones other middlewares send.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from romebert.service.errors import ApiError, error_response
from romebert.service.metrics import Metrics, outcome_of


class BodyLimit:
    """413 for a body over `max_bytes`: at once when Content-Length says so, else as soon as the
    bytes received pass the limit (a missing or lying Content-Length, chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, "body_too_large", f"request body {size} exceeds the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = self._too_large(f"of {declared} bytes")
            await error_response(err.status_code, err.code, str(err.detail))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"of more than {received} bytes")  # answered by the ApiError handler
            return message

        await self.app(scope, limited_receive, send)


class ClassifyMetrics:
    """Counts every POST /classify by outcome, times it, and tracks how many are in flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics, path: str = "/classify"):
        self.app = app
        self.metrics = metrics
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before it answers

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_duration.observe(time.perf_counter() - started)
            self.metrics.requests.labels(outcome_of(status)).inc()
