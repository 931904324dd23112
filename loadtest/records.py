"""What a run leaves behind: one record per completed request, and the run's outcome.

Plain data, free of the load generators, so that reporting and plotting import neither; both
generators (driver.py, and Locust's users.py) read answers into records with `record_of`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from romebert.loadtest.workload import Request


@dataclass(frozen=True)
class RequestRecord:
    start_s: float  # since the run started
    latency_ms: float  # client-side, send to last byte
    lag_ms: float  # how late the request left against its open-loop schedule (0 in closed loop)
    status: int  # HTTP status; 0 when no response came (connection refused, timeout)
    profile: str
    items: int
    exit_layers: tuple[int, ...] = ()
    budget_exhausted: int = 0
    truncated: int = 0
    server_latency_ms: float | None = None
    budget_ms: float | None = None  # the latency_budget_ms the request carried
    error: str | None = None  # set for every failed request: the contract's error code, else what went wrong
    error_message: str | None = None  # the server's own message, when its error body had one

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    elapsed_s: float
    stop_reason: str  # "duration", "max-requests" or "interrupt"
    abandoned: int  # requests sent but not answered when the run ended
    unsent: int = 0  # open loop: sends skipped because every connection of the pool was busy


def record_of(status: int, text: str | None, request: Request, start_s: float, latency_ms: float, lag_ms: float) -> RequestRecord:
    """Read a /classify answer into a record; a 2xx whose body breaks the contract counts as failed."""
    base: dict[str, Any] = dict(start_s=start_s, latency_ms=latency_ms, lag_ms=lag_ms, status=status, profile=request.profile,
                                items=request.items, budget_ms=request.body.get("latency_budget_ms"))
    if not 200 <= status < 300:
        code, message = _error_of(status, text)
        return RequestRecord(**base, error=code, error_message=message)
    try:
        answer = json.loads(text or "")
        results = answer["results"]
        if len(results) != request.items:
            raise ValueError(f"{len(results)} results for {request.items} items")
        return RequestRecord(
            **base,
            exit_layers=tuple(int(r["exit_layer"]) for r in results),
            budget_exhausted=sum(bool(r["budget_exhausted"]) for r in results),
            truncated=sum(bool(r["truncated"]) for r in results),
            server_latency_ms=float(answer["latency_ms"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        return RequestRecord(**base, error=f"invalid body: {err}")


def _error_of(status: int, text: str | None) -> tuple[str, str | None]:
    """The contract's error code and message ({"error": {"code": ..., "message": ...}}) when the body
    has them, else the status and no message."""
    if status == 0:
        return "no response", None
    try:
        error = json.loads(text or "")["error"]
        return str(error["code"]), (str(error["message"]) if "message" in error else None)
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}", None
