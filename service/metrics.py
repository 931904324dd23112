"""The Prometheus metrics of the server (DESIGN.md, Contract 4).

The names are a contract with dashboards and alerts: change them only on purpose. Each app owns
its CollectorRegistry, so several apps in one process (tests, benchmarks) never share counts.
No metric carries a per-request label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

OUTCOMES = ("ok", "invalid", "too_large", "overloaded", "error")

# Request latency from 1 ms to 10 s: the span between a one-layer exit on a GPU and a full-depth
# batch on a loaded CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def outcome_of(status: int) -> str:
    """The outcome label a /classify response with this HTTP status counts under."""
    if status < 400:
        return "ok"
    if status == 413:
        return "too_large"
    if status in (429, 503):
        return "overloaded"
    if status < 500:
        return "invalid"
    return "error"


class Metrics:
    def __init__(self, num_layers: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("romebert_requests", "POST /classify requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export every outcome at 0, so rate() sees the first error
        self.request_duration = Histogram(
            "romebert_request_duration_seconds", "POST /classify latency, server side", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "romebert_queue_wait_seconds", "time an item waited from arrival until the engine took it", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "romebert_batch_size", "rows in each engine layer call (the survivors of earlier exits)", buckets=BATCH_BUCKETS, registry=r
        )
        # One bucket per layer, so bucket counts are exit-layer counts and _sum/_count is the mean exit depth.
        self.exit_layer = Histogram(
            "romebert_exit_layer", "exit layer of each answered item", buckets=tuple(range(1, num_layers + 1)), registry=r
        )
        self.layers_executed = Counter("romebert_layers_executed", "encoder layers run, summed over answered items", registry=r)
        self.budget_exhausted = Counter(
            "romebert_budget_exhausted", "items answered early because the next layer would overrun their latency budget", registry=r
        )
        self.inflight = Gauge("romebert_inflight_requests", "POST /classify requests being handled", registry=r)
        self.queue_depth = Gauge("romebert_queue_depth", "items waiting for the engine", registry=r)
        self.model_info = Info("romebert_model", "the model bundle being served", registry=r)

    def answered(self, exit_layer: int, budget_exhausted: bool) -> None:
        """One item answered from `exit_layer` after running exactly that many layers."""
        self.exit_layer.observe(exit_layer)
        self.layers_executed.inc(exit_layer)
        if budget_exhausted:
            self.budget_exhausted.inc()
