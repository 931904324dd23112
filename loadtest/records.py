"""What a run leaves behind: one record per completed request, and the run's outcome.

Plain data, free of Locust, so that reporting and plotting never import the load generator.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    error: str | None = None  # set for every failed request

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    elapsed_s: float
    stop_reason: str  # "duration" or "max-requests"
    abandoned: int  # requests claimed but not completed when the duration ran out
