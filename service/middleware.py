"""Pure ASGI middlewares for POST /classify: the metrics, the guard on bodies, and the route's
short way in.

Pure ASGI (not BaseHTTPMiddleware) because they need the raw message stream: the guard counts the
bytes actually received and times their arrival, and the metrics need the status of every
response, including the ones the guard sends. (The admission door answers before the app is
called at all: connections.py.)
"""

from __future__ import annotations

import asyncio
import time

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from romebert.service.errors import ApiError, answer_error, error_response
from romebert.service.metrics import Metrics
from romebert.service.routes import CLASSIFY


def is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class RequestGuard:
    """For the requests of `path` (POST /classify, the one route that reads a body): 415 unless it is declared JSON; 413 once it passes
    `max_bytes` (at once when Content-Length says so, else as the bytes arrive: a missing or lying
    Content-Length, chunked uploads); 408 and a closed connection when it has not fully arrived
    `timeout_s` after the headers (a client that stalls mid-body holds nothing for long)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, path: str = CLASSIFY):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.path = path

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, "body_too_large", f"request body {size} exceeds the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        problem = None
        if declared.isdigit() and int(declared) > self.max_bytes:
            problem = self._too_large(f"of {declared} bytes")
        elif not is_json(headers.get("content-type", "")):
            problem = ApiError(415, "unsupported_media_type",
                               f"the body must be JSON (Content-Type: application/json), not {headers.get('content-type') or 'undeclared'}")
        if problem is not None:
            await error_response(problem.status_code, problem.code, str(problem.detail))(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received, complete = 0, False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: only http.disconnect can come, and waiting for it is fine
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s",
                               headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"of more than {received} bytes")  # answered by the ApiError handler
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)


class ClassifyMetrics:
    """Counts every POST /classify by outcome, times it, and tracks how many are in flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics, path: str = CLASSIFY):
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
            self.metrics.responded(status, time.perf_counter() - started)


class DirectRoute:
    """Requests for `route` (its path and methods) handed straight to the route's handler, past
    what FastAPI and Starlette put between the middlewares and a route (the exception middleware,
    the exit stack, the router's matching, the request and response wrappers). For POST /classify
    those layers do nothing, yet took about a sixth of the event loop's time a request
    (docs/results.md, "The busy route's short way"). The handler's errors are answered by the
    app's own exception handlers, as the exception middleware would; FastAPI still documents the
    route, answers its other methods (405) and serves every other path."""

    def __init__(self, app: ASGIApp, route: APIRoute):
        self.app = app
        self.path, self.methods = route.path, route.methods
        self.handler = route.get_route_handler()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.handler(request)
        except Exception as exc:
            response = await answer_error(scope["app"], request, exc)
        await response(scope, receive, send)
