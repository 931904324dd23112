"""The HTTP routes: request in, scheduler call, response out. No model logic lives here."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from romebert.service.errors import ApiError
from romebert.core.exits import softmax
from romebert.service.runtime import RETRY_AFTER_S, Phase, Runtime
from romebert.service.scheduler import EngineFailure, Exit, QueueFull, SchedulerClosed
from romebert.service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, ItemResult

router = APIRouter()

_ERRORS = {
    413: {"model": ErrorResponse, "description": "too many items (too_many_items) or body too large (body_too_large)"},
    422: {"model": ErrorResponse, "description": "invalid input (invalid_request); details name each field"},
    503: {"model": ErrorResponse, "description": "overloaded, loading or shutting down; see Retry-After"},
}


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def to_result(answer: Exit, truncated: bool, labels: list[str]) -> ItemResult:
    probabilities = softmax(answer.logits.astype(np.float64))
    return ItemResult(
        label=labels[int(probabilities.argmax())],
        probabilities=dict(zip(labels, probabilities.tolist())),
        exit_layer=answer.exit_layer,
        layers_used=answer.exit_layer,
        entropy=answer.entropy,
        budget_exhausted=answer.budget_exhausted,
        truncated=truncated,
        latency_ms=answer.latency_s * 1000,
    )


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Classify one text or a list; each item leaves the model at its own exit."""
    runtime = _runtime(request)
    arrival = runtime.clock()
    texts = body.texts
    if len(texts) > runtime.settings.max_items:
        raise ApiError(413, "too_many_items", f"{len(texts)} texts in one request; the limit is {runtime.settings.max_items}")
    threshold = body.entropy_threshold
    if threshold is None:
        threshold = runtime.bundle.default_threshold  # calibrated at export, within [0, ln C]
    elif threshold > runtime.max_entropy:
        message = f"entropy_threshold {threshold} is above ln({len(runtime.labels)}) = {runtime.max_entropy:.4f}, the largest entropy an exit can have"
        raise ApiError(422, "invalid_request", message, [{"field": "entropy_threshold", "message": message, "type": "less_than_equal"}])
    scheduler = runtime.check_ready()
    if len(texts) == 1:  # tokenizing one text (~70 us) costs less than a hop to a worker thread
        encoded = runtime.encoder.encode(texts, body.text_pairs)
    else:
        encoded = await run_in_threadpool(runtime.encoder.encode, texts, body.text_pairs)
    budget_s = None if body.latency_budget_ms is None else body.latency_budget_ms / 1000
    try:
        futures = scheduler.submit(encoded, threshold, budget_s, arrival)
    except QueueFull as err:
        raise ApiError(503, "overloaded", f"the queue is full ({err}); retry later", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except SchedulerClosed:
        raise ApiError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    try:
        answers = await asyncio.gather(*futures)
    except EngineFailure as err:
        raise ApiError(500, "engine_failure", str(err)) from None
    results = [to_result(a, bool(t), runtime.labels) for a, t in zip(answers, encoded.truncated)]
    return ClassifyResponse(results=results, latency_ms=(runtime.clock() - arrival) * 1000)


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    """Alive: the process serves HTTP. 503 only if loading the model failed for good."""
    runtime = _runtime(request)
    if runtime.phase is Phase.FAILED:
        runtime.check_ready()  # raises the model_failed error
    return {"status": "alive", "phase": runtime.phase.value}


@router.get("/readyz", responses={503: {"model": ErrorResponse, "description": "loading, failed or shutting down"}})
async def readyz(request: Request) -> dict:
    """Ready: the bundle is verified, loaded and warmed up, and the server is not shutting down."""
    runtime = _runtime(request)
    runtime.check_ready()
    return {"status": "ready", "num_layers": runtime.bundle.num_layers, "labels": runtime.labels}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(_runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
