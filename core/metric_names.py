"""The server's Prometheus metrics (DESIGN.md, Contract 4), named once.

The server builds its collectors from this list, the load tester reads its scrapes by it, and the
tests check the dashboards and alert rules against it, so a rename cannot slip past any of them.
Names follow Prometheus conventions: one prefix, base units, `_total` added to counters by the
client library, histograms for distributions, no per-request labels.
"""

from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    name: str  # as declared; the exposition adds _total (counters), _bucket/_sum/_count (histograms), _info (info)
    kind: str  # counter | histogram | gauge | info
    help: str
    labels: tuple[str, ...] = ()


REQUESTS = Metric("romebert_requests", "counter", "POST /classify requests by outcome", ("outcome",))
REQUEST_DURATION = Metric("romebert_request_duration_seconds", "histogram", "POST /classify latency, server side")
QUEUE_WAIT = Metric("romebert_queue_wait_seconds", "histogram", "time a row waited from arrival until a worker took it")
BATCH_SIZE = Metric("romebert_batch_size", "histogram", "rows in each engine layer call (the survivors of earlier exits)")
EXIT_LAYER = Metric("romebert_exit_layer", "histogram", "exit layer of each answered item (one bucket per layer)")
LAYERS_EXECUTED = Metric("romebert_layers_executed", "counter", "encoder layers run, summed over answered items")
LAYER_TOKENS = Metric("romebert_layer_tokens", "counter", "token positions run through encoder layers, by kind: the rows' own "
                      "tokens (real) or padding (rows of different lengths in one batch, shape buckets)", ("kind",))
BUDGET_EXHAUSTED = Metric("romebert_budget_exhausted", "counter", "items answered early because the next layer would overrun their latency budget")
REJECTED = Metric("romebert_rejected_requests", "counter", "requests turned away before any work, by reason", ("reason",))
SHED_ROWS = Metric("romebert_shed_rows", "counter", "rows dropped from the queue or a batch without an answer from the model, by reason", ("reason",))
PREDICTED_WAIT = Metric("romebert_predicted_wait_seconds", "gauge", "the queue wait admission predicts for a request arriving now")
INFLIGHT = Metric("romebert_inflight_requests", "gauge", "POST /classify requests being handled")
QUEUE_DEPTH = Metric("romebert_queue_depth", "gauge", "rows waiting for a worker")
MODEL = Metric("romebert_model", "info", "the model bundle being served and the device it runs on")

METRICS: tuple[Metric, ...] = (
    REQUESTS, REQUEST_DURATION, QUEUE_WAIT, BATCH_SIZE, EXIT_LAYER, LAYERS_EXECUTED, LAYER_TOKENS, BUDGET_EXHAUSTED,
    REJECTED, SHED_ROWS, PREDICTED_WAIT, INFLIGHT, QUEUE_DEPTH, MODEL,
)

# Label values are fixed sets (no cardinality surprises); every one is exported from the start at 0.
OUTCOMES = ("ok", "invalid", "too_large", "slow_client", "overloaded", "cancelled", "error")
REJECT_REASONS = ("predicted_wait", "loop_lag", "budget", "queue_full", "draining")
SHED_REASONS = ("expired", "cancelled", "draining", "worker_failed")
TOKEN_KINDS = ("real", "padding")


def series(metric: Metric) -> tuple[str, ...]:
    """The sample names a metric appears under in the text exposition."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    return tuple(metric.name + s for s in suffixes[metric.kind])

