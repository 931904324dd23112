"""The Locust user that POSTs /classify, and the gate that bounds and paces it.

Latency is measured here around each request, and every request is kept (not only Locust's
aggregated stats) because the report needs exact percentiles and the exit layers of each answer.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, constant, task
from locust.exception import StopUser

from romebert.loadtest.records import RequestRecord
from romebert.loadtest.workload import Workload


class Gate:
    """Hands out request slots: at most `max_requests`, and `rate` per second when set (open loop).

    The schedule is global (slot k starts at t0 + k/rate, whichever user is free takes it), so the
    arrival rate stays constant however latency varies, as long as some user is idle. Locust runs
    all users as greenlets of one thread, so plain counters need no lock.
    """

    def __init__(self, max_requests: int | None = None, rate: float | None = None):
        self.max_requests = max_requests
        self.interval = 1.0 / rate if rate else 0.0
        self.issued = 0
        self.in_flight = 0
        self._next_slot: float | None = None

    def claim(self) -> float | None:
        """The perf_counter time at which to send the next request, or None when the run is spent."""
        if self.max_requests is not None and self.issued >= self.max_requests:
            return None
        self.issued += 1
        self.in_flight += 1
        now = time.perf_counter()
        if not self.interval:
            return now
        slot = now if self._next_slot is None else self._next_slot
        self._next_slot = slot + self.interval
        return slot

    def release(self) -> None:
        self.in_flight -= 1

    @property
    def spent(self) -> bool:
        return self.max_requests is not None and self.issued >= self.max_requests and self.in_flight == 0


class Recorder:
    """Collects the records of one run; times are relative to its creation, the start of the run."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.records: list[RequestRecord] = []


class ClassifyUser(FastHttpUser):
    """POSTs /classify back to back; a subclass sets the workload (and, for `romebert loadtest`, gate and recorder)."""

    abstract = True
    wait_time = constant(0)
    workload: ClassVar[Workload]
    gate: ClassVar[Gate | None] = None
    recorder: ClassVar[Recorder | None] = None
    _ids: ClassVar[itertools.count] = itertools.count()

    def on_start(self) -> None:
        # Distinct per user and per Locust worker, reproducible from the seed.
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.rng = random.Random(f"{self.workload.seed}:{worker}:{next(self._ids)}")

    @task
    def classify(self) -> None:
        slot = self.gate.claim() if self.gate else time.perf_counter()
        if slot is None:
            raise StopUser()
        try:
            gevent.sleep(max(0.0, slot - time.perf_counter()))
            request = self.workload.draw(self.rng)
            started = time.perf_counter()
            response = self.client.post("/classify", json=request.body, name=f"/classify [{request.profile}]")
            latency_ms = (time.perf_counter() - started) * 1000
            if self.recorder is not None:
                self.recorder.records.append(
                    _record(response.status_code or 0, response.text, request.items, request.profile,
                            started - self.recorder.t0, latency_ms, (started - slot) * 1000, request.body.get("latency_budget_ms"))
                )
        finally:
            if self.gate:
                self.gate.release()


def _record(status: int, text: str | None, items: int, profile: str, start_s: float, latency_ms: float, lag_ms: float,
            budget_ms: float | None = None) -> RequestRecord:
    """Read a /classify answer into a record; a 2xx whose body breaks the contract counts as failed."""
    base: dict[str, Any] = dict(start_s=start_s, latency_ms=latency_ms, lag_ms=lag_ms, status=status, profile=profile, items=items,
                                budget_ms=budget_ms)
    if not 200 <= status < 300:
        return RequestRecord(**base, error=_error_code(status, text))
    try:
        answer = json.loads(text or "")
        results = answer["results"]
        if len(results) != items:
            raise ValueError(f"{len(results)} results for {items} items")
        return RequestRecord(
            **base,
            exit_layers=tuple(int(r["exit_layer"]) for r in results),
            budget_exhausted=sum(bool(r["budget_exhausted"]) for r in results),
            truncated=sum(bool(r["truncated"]) for r in results),
            server_latency_ms=float(answer["latency_ms"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        return RequestRecord(**base, error=f"invalid body: {err}")


def _error_code(status: int, text: str | None) -> str:
    """The contract's error code ({"error": {"code": ...}}) when the body has one, else the status."""
    if status == 0:
        return "no response"
    try:
        return str(json.loads(text or "")["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"
