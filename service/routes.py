"""The HTTP routes: request in, scheduler call, response out. No model logic lives here.

The router is made per app (`make_router`) because the request schema depends on the bundle.
Work that can take long never runs on the event loop: a request with more text than
INLINE_TOKENIZE_CHARS is tokenized in a thread (the Rust tokenizer releases the GIL), so health
and metrics answer in milliseconds whatever clients send; a short one is tokenized inline, text by
text, without the tokenizer's thread pool (waiting on it stalled the loop under overload).
"""

# No `from __future__ import annotations` here: FastAPI must see the request model itself, not the
# name of a local variable, in classify's signature.
import asyncio
import math
from typing import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from romebert.core.tokenization import TokenRow
from romebert.service.errors import ERROR_RESPONSES
from romebert.service.runtime import Phase, Runtime
from romebert.service.schemas import ClassifyRequestBase, ClassifyResponse, ErrorResponse
from romebert.service.tickets import EngineFailure, Exit, Rejected, Ticket

# Up to this many characters a request is tokenized on the loop (up to about 1 ms of it); handing
# shorter texts to a thread freed the loop but served no more and answered a lone request later
# (docs/results.md, "Tokenizing on the loop or in a thread").
INLINE_TOKENIZE_CHARS = 2_000
CLASSIFY = "/classify"
_NOT_READY = {503: {"model": ErrorResponse, "description": "loading, failed or shutting down"}}
_PROMETHEUS_TEXT = {200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                          "description": "Prometheus text exposition format 0.0.4"}}


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def render(answers: list[Exit], tokens: list[TokenRow], labels: list[str], latency_s: float) -> Response:
    """The answer as JSON, serialized by pydantic's Rust encoder (five times `json.dumps`'s speed
    here). That encoder writes NaN where JSON has none, so an exit whose logits were not finite
    (its entropy then is not either) fails the request as the engine's failure instead."""
    results = []
    for answer, row in zip(answers, tokens):
        if not math.isfinite(answer.entropy):
            raise EngineFailure(f"engine failure: exit {answer.exit_layer} gave logits that are not finite")
        results.append({
            "label": labels[int(answer.probabilities.argmax())],
            "probabilities": dict(zip(labels, answer.probabilities.tolist())),
            "exit_layer": answer.exit_layer,
            "layers_used": answer.exit_layer,
            "entropy": answer.entropy,
            "budget_exhausted": answer.budget_exhausted,
            "truncated": row.truncated,
            "latency_ms": answer.latency_s * 1000,
        })
    return Response(to_json({"results": results, "latency_ms": latency_s * 1000}), media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read already, so only http.disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answers_of(ticket: Ticket, request: Request, timeout_s: float) -> list[Exit]:
    """The ticket's answers; if the client leaves or the request's time runs out first, the
    ticket is cancelled so its rows leave the queue and their batches before the next layer.

    The watch on the connection and the timer cancel the ticket from their callbacks, and this
    awaits the ticket's future alone: `asyncio.wait` on both took a set, a waiter, four callbacks
    and one more turn of the loop a request (docs/results.md, "Waiting for the answer")."""
    loop = asyncio.get_running_loop()
    gone = loop.create_task(_disconnected(request))
    gone.add_done_callback(lambda watch: watch.cancelled() or ticket.cancel())
    timer = loop.call_later(timeout_s, ticket.cancel)
    try:
        return await ticket.future
    except asyncio.CancelledError:
        ticket.cancel()  # whoever cancelled, nobody waits for its rows any more
        if gone.done() and not gone.cancelled():
            raise ClientDisconnect() from None
        if loop.time() >= timer.when():
            raise Rejected("deadline_exceeded", f"no answer within the server's request timeout of {timeout_s:g} s") from None
        raise  # this task itself was cancelled
    finally:
        timer.cancel()
        gone.cancel()


async def read_body(request: Request) -> bytes:
    """The request's whole body, as Starlette's `Request.body()` reads it (a client that leaves
    before it is in: ClientDisconnect) but without that method's async generator, which took a
    measurable part of the loop's time a request (docs/results.md, "Waiting for the answer")."""
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class BodyAndRequestRoute(APIRoute):
    """A route whose endpoint takes one JSON body model and the Request, and nothing else; the
    body is validated by pydantic straight from the request's bytes (`model_validate_json`).

    FastAPI's own handler decodes the JSON into Python objects, validates those, and solves the
    endpoint's dependencies on every request, a measurable part of the server's own CPU a request
    (docs/results.md, "FastAPI's request handling"); an endpoint with nothing to inject needs none
    of it. FastAPI documents the route from the endpoint's signature; the app calls this handler
    straight (middleware.DirectRoute), and its errors are answered by errors.py's handlers (a
    body that is not JSON: 400)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        dependant = self.dependant
        others = [*dependant.path_params, *dependant.query_params, *dependant.header_params, *dependant.cookie_params, *dependant.dependencies]
        if len(dependant.body_params) != 1 or dependant.request_param_name is None or others:
            raise TypeError(f"{self.path}: a {type(self).__name__} endpoint takes (body model, Request) and nothing else")
        model = dependant.body_params[0].field_info.annotation
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            try:
                body = model.model_validate_json(await read_body(request))
            except ValidationError as err:  # located as FastAPI locates body errors, under "body"
                raise RequestValidationError([error | {"loc": ("body", *error["loc"])} for error in err.errors()]) from None
            return await endpoint(body, request)

        return handler


def make_router(request_model: type[ClassifyRequestBase]) -> APIRouter:
    router = APIRouter()

    async def classify(body: request_model, request: Request) -> Response:  # type: ignore[valid-type]
        """Classify one text or a list; each item leaves the model at its own exit."""
        runtime = _runtime(request)
        arrival = runtime.clock()
        scheduler = runtime.check_ready()
        texts, pairs = body.texts, body.text_pairs
        if sum(map(len, texts)) + sum(map(len, pairs or ())) <= INLINE_TOKENIZE_CHARS:
            tokens = runtime.encoder.tokenize(texts, pairs, parallel=False)
        else:
            tokens = await run_in_threadpool(runtime.encoder.tokenize, texts, pairs)
        threshold = runtime.bundle.default_threshold if body.entropy_threshold is None else body.entropy_threshold
        budget_s = None if body.latency_budget_ms is None else body.latency_budget_ms / 1000
        ticket = scheduler.submit(tokens, threshold, budget_s, arrival)
        answers = await answers_of(ticket, request, runtime.settings.request_timeout_s)
        return render(answers, tokens, runtime.labels, runtime.clock() - arrival)

    router.add_api_route(CLASSIFY, classify, methods=["POST"], response_model=ClassifyResponse, responses=ERROR_RESPONSES,
                         route_class_override=BodyAndRequestRoute)

    @router.get("/healthz", responses=_NOT_READY)
    async def healthz(request: Request) -> dict:
        """Alive: the process serves HTTP and its workers run. 503 once it is failing (it then exits)."""
        runtime = _runtime(request)
        if runtime.phase is Phase.FAILED:
            runtime.check_ready()  # raises the model_failed error
        return {"status": "alive", "phase": runtime.phase.value}

    @router.get("/readyz", responses=_NOT_READY)
    async def readyz(request: Request) -> dict:
        """Ready: the bundle is verified, loaded on its device and warmed up, and the server is not draining."""
        runtime = _runtime(request)
        runtime.check_ready()
        return {"status": "ready", "device": runtime.device, "backend": runtime.backend, "num_layers": runtime.bundle.num_layers,
                "labels": runtime.labels}

    @router.get("/metrics", response_class=Response, responses=_PROMETHEUS_TEXT)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(generate_latest(_runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
