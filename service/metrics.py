"""The server's Prometheus collectors, built from the one list of names in core/metric_names.py.

Each app owns its CollectorRegistry, so several apps in one process (tests, benchmarks) never
share counts. No metric carries a per-request label.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from romebert.core import metric_names as names

# No *_created samples: nothing reads them, and they would double what every scrape carries.
disable_created_metrics()

# Request latency from 1 ms to 10 s: the span between a one-layer exit on a GPU and a full-depth
# batch on a loaded CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def outcome_of(status: int) -> str:
    """The outcome label a /classify response with this HTTP status counts under."""
    if status < 400:
        return "ok"
    return {408: "slow_client", 413: "too_large", 429: "overloaded", 499: "cancelled", 503: "overloaded"}.get(
        status, "invalid" if status < 500 else "error"
    )


class Metrics:
    def __init__(self, num_layers: int, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()

        def counter(metric: names.Metric, values: tuple[str, ...] = ()) -> Counter:
            made = Counter(metric.name, metric.help, list(metric.labels), registry=r)
            for value in values:
                made.labels(value)  # exported at 0 from the start, so rate() sees the first one
            return made

        def histogram(metric: names.Metric, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(metric.name, metric.help, buckets=buckets, registry=r)

        def gauge(metric: names.Metric) -> Gauge:
            return Gauge(metric.name, metric.help, registry=r)

        self.requests = counter(names.REQUESTS, names.OUTCOMES)
        self._by_outcome = {outcome: self.requests.labels(outcome) for outcome in names.OUTCOMES}  # looked up once, not per request
        self.request_duration = histogram(names.REQUEST_DURATION, LATENCY_BUCKETS)
        self.queue_wait = histogram(names.QUEUE_WAIT, LATENCY_BUCKETS)
        self.batch_size = histogram(names.BATCH_SIZE, BATCH_BUCKETS)
        # One bucket per layer: bucket counts are exit-layer counts, _sum/_count the mean exit depth.
        self.exit_layer = histogram(names.EXIT_LAYER, tuple(range(1, num_layers + 1)))
        self.layers_executed = counter(names.LAYERS_EXECUTED)
        self.layer_tokens = counter(names.LAYER_TOKENS, names.TOKEN_KINDS)
        self._real_tokens, self._padding_tokens = (self.layer_tokens.labels(kind) for kind in names.TOKEN_KINDS)  # looked up once, not per layer call
        self.budget_exhausted = counter(names.BUDGET_EXHAUSTED)
        self.rejected = counter(names.REJECTED, names.REJECT_REASONS)
        self.shed_rows = counter(names.SHED_ROWS, names.SHED_REASONS)
        self.predicted_wait = gauge(names.PREDICTED_WAIT)
        self.inflight = gauge(names.INFLIGHT)
        self.queue_depth = gauge(names.QUEUE_DEPTH)
        self.model_info = Info(names.MODEL.name, names.MODEL.help, registry=r)

    def responded(self, status: int, seconds: float) -> None:
        """One POST /classify answered with `status` after `seconds` (whichever layer answered it)."""
        self._by_outcome[outcome_of(status)].inc()
        self.request_duration.observe(seconds)

    def layer_ran(self, rows: int, attention_mask: np.ndarray) -> None:
        """One engine layer call on `rows` real rows; the mask's other positions (and any rows
        past `rows`, an engine's shape-bucket fill) were padding."""
        real = int(attention_mask[:rows].sum())
        self.batch_size.observe(rows)
        self._real_tokens.inc(real)
        self._padding_tokens.inc(attention_mask.size - real)

    def answered(self, exit_layer: int, budget_exhausted: bool) -> None:
        """One item answered from `exit_layer` after running exactly that many layers."""
        self.exit_layer.observe(exit_layer)
        self.layers_executed.inc(exit_layer)
        if budget_exhausted:
            self.budget_exhausted.inc()
