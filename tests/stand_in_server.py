"""TEST DOUBLE of the romebert server for the load-test tests: the HTTP contract, none of the model.

It answers POST /classify with made-up but deterministic exits and exposes the real metric names
through a real prometheus_client registry, so the load tester's scrape-and-delta logic runs on the
genuine exposition format. It remembers every exit layer it served, for the tests to compare
against the report. Not the service: see service/ for that.

Rules (three layers):
  * a text containing "overload" -> 503 with Retry-After and the contract's error body, refused at
    the door (rejected, reason predicted_wait);
  * a text containing "too late" -> the same 503, its rows shed after waiting (reason expired);
  * entropy_threshold above ln 2 -> 422 invalid_request (the real server's ceiling for two labels);
  * a text containing "stall" -> answered after STALL_S (a server that hangs);
  * entropy_threshold >= 0.5 -> exit 1; a smaller threshold -> exit 3;
  * latency_budget_ms set -> exit 2 with budget_exhausted (the budget "ran out" after layer 2);
  * neither -> exit 1 + len(text) % 3.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel

NUM_LAYERS = 3
STALL_S = 10.0
LABELS = ("negative", "positive")


class ClassifyBody(BaseModel):
    text: str | list[str]
    text_pair: str | list[str] | None = None
    entropy_threshold: float | None = None
    latency_budget_ms: float | None = None


class StandIn:
    """The app plus what it served: `exit_layers` (per item), `rejected` (503s sent) and `shed_rows`."""

    def __init__(self) -> None:
        self.url = ""  # set by serve()
        self.exit_layers: list[int] = []
        self.rejected = 0
        self.shed_rows = 0
        self.bodies: list[ClassifyBody] = []
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("romebert_requests_total", "requests by outcome", ["outcome"], registry=r)
        self.duration = Histogram("romebert_request_duration_seconds", "request latency", registry=r)
        Histogram("romebert_queue_wait_seconds", "queue wait", registry=r)
        self.batch_size = Histogram("romebert_batch_size", "batch size", buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.refused = Counter("romebert_rejected_requests_total", "requests turned away", ["reason"], registry=r)
        self.shed = Counter("romebert_shed_rows_total", "rows dropped without an answer", ["reason"], registry=r)
        self.exit_layer = Histogram("romebert_exit_layer", "exit layer per item", buckets=tuple(range(1, NUM_LAYERS + 1)), registry=r)
        self.layers = Counter("romebert_layers_executed_total", "layers executed", registry=r)
        self.budget = Counter("romebert_budget_exhausted_total", "items cut by their budget", registry=r)
        Gauge("romebert_inflight_requests", "requests in flight", registry=r)
        Gauge("romebert_queue_depth", "queued requests", registry=r)
        Info("romebert_model", "the bundle served", registry=r).info({"model": "stand-in", "num_layers": str(NUM_LAYERS), "precision": "fp32"})
        self.app = self._app()

    def _app(self) -> FastAPI:
        app = FastAPI()
        app.get("/healthz")(lambda: {"status": "ok"})
        app.get("/readyz")(lambda: {"status": "ready"})
        app.get("/metrics")(lambda: Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST))
        app.post("/classify")(self._classify)
        return app

    def _classify(self, body: ClassifyBody):
        started = time.perf_counter()
        self.bodies.append(body)
        texts = [body.text] if isinstance(body.text, str) else body.text
        if body.entropy_threshold is not None and body.entropy_threshold > math.log(2):
            message = f"invalid request: entropy_threshold: Input should be less than or equal to {math.log(2)}"
            return JSONResponse({"error": {"code": "invalid_request", "message": message}}, status_code=422)
        if any("stall" in t for t in texts):
            time.sleep(STALL_S)  # a sync route: uvicorn runs it in a thread, the other requests go on
        refused, late = (any(word in t for t in texts) for word in ("overload", "too late"))
        if refused or late:
            self.rejected += 1
            self.requests.labels(outcome="rejected").inc()
            if refused:
                self.refused.labels(reason="predicted_wait").inc()
            else:
                self.shed_rows += len(texts)
                self.shed.labels(reason="expired").inc(len(texts))
            error = {"error": {"code": "overloaded", "message": "queue full"}}
            return JSONResponse(error, status_code=503, headers={"Retry-After": "1"})
        results = [self._item(text, body) for text in texts]
        self.batch_size.observe(len(texts))  # one engine call per request, as if nothing were batched across requests
        self.requests.labels(outcome="ok").inc()
        self.duration.observe(time.perf_counter() - started)
        return {"results": results, "latency_ms": 1000 * (time.perf_counter() - started)}

    def _item(self, text: str, body: ClassifyBody) -> dict:
        budget_cut = body.latency_budget_ms is not None
        if budget_cut:
            layer = 2
        elif body.entropy_threshold is not None:
            layer = 1 if body.entropy_threshold >= 0.5 else NUM_LAYERS
        else:
            layer = 1 + len(text) % NUM_LAYERS
        self.exit_layers.append(layer)
        self.exit_layer.observe(layer)
        self.layers.inc(layer)
        if budget_cut:
            self.budget.inc()
        return {
            "label": LABELS[layer % 2], "probabilities": {LABELS[0]: 0.25, LABELS[1]: 0.75}, "exit_layer": layer,
            "layers_used": layer, "entropy": 0.56, "budget_exhausted": budget_cut, "truncated": False, "latency_ms": 0.1,
        }


@contextmanager
def serve(stand_in: StandIn) -> Iterator[str]:
    """Run the stand-in under uvicorn in a daemon thread on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(stand_in.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stand-in server did not start")
        time.sleep(0.01)
    stand_in.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield stand_in.url
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
