"""Server-side exit depth over a run: GET /metrics before and after, and the difference.

The server's own counters are the ground truth for how deep requests went (the client only sees
the answers it got back), why it turned requests away and how full its engine calls were; the
before/after delta confines them to this run. Other traffic hitting the same server during the
run is counted too; behind a load balancer, point --metrics-url at one replica and compare with
that replica's share of the traffic.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from romebert.core import metric_names as names

EXIT_BUCKET, EXIT_SUM, EXIT_COUNT = names.series(names.EXIT_LAYER)
_, BATCH_SUM, BATCH_COUNT = names.series(names.BATCH_SIZE)
(REQUESTS_TOTAL,), (LAYERS_TOTAL,), (TOKENS_TOTAL,), (BUDGET_TOTAL,), (REJECTED_TOTAL,), (SHED_TOTAL,) = (
    names.series(m) for m in (names.REQUESTS, names.LAYERS_EXECUTED, names.LAYER_TOKENS, names.BUDGET_EXHAUSTED, names.REJECTED, names.SHED_ROWS))
(MODEL_INFO,) = names.series(names.MODEL)

# sample name -> label set (sorted pairs) -> value
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


class ScrapeError(RuntimeError):
    pass


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as err:
        raise ScrapeError(f"GET {url}: {getattr(err, 'reason', err)}") from None
    try:
        return parse(text)
    except ValueError as err:
        raise ScrapeError(f"GET {url}: not Prometheus text ({err})") from None


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@dataclass(frozen=True)
class ServerDelta:
    items: float  # answers counted by romebert_exit_layer (one observation per item)
    average_exit_layer: float | None
    exit_layers: dict[str, float]  # layer ("1", "2", ... or "+Inf") -> items that exited there
    layers_executed: float
    budget_exhausted: float
    requests_by_outcome: dict[str, float]
    rejected_by_reason: dict[str, float]  # requests turned away at the door, before any work
    shed_rows_by_reason: dict[str, float]  # rows admitted, then dropped unanswered (the other 503s)
    mean_batch_size: float | None  # rows per engine layer call: how well the server batched under this load
    padding_share: float | None  # of the token positions its layer calls ran, the share that was padding
    model: dict[str, str] = field(default_factory=dict)  # romebert_model_info labels
    restarted: bool = False  # a counter went down: the server restarted, the delta covers only its new life


def delta(before: Samples, after: Samples) -> ServerDelta:
    restarted = _total(after, EXIT_COUNT) < _total(before, EXIT_COUNT)
    if restarted:
        before = {}
    count, total, calls, rows = (_grown(before, after, name) for name in (EXIT_COUNT, EXIT_SUM, BATCH_COUNT, BATCH_SUM))
    info = next(iter(after.get(MODEL_INFO, {})), ())
    tokens = {kind: 0.0 for kind in names.TOKEN_KINDS} | _by_label(before, after, TOKENS_TOTAL, "kind")
    ran = sum(tokens.values())
    return ServerDelta(
        items=count,
        average_exit_layer=total / count if count > 0 else None,
        exit_layers=_bucket_counts(before, after),
        layers_executed=_grown(before, after, LAYERS_TOTAL),
        budget_exhausted=_grown(before, after, BUDGET_TOTAL),
        requests_by_outcome=_by_label(before, after, REQUESTS_TOTAL, "outcome"),
        rejected_by_reason=_by_label(before, after, REJECTED_TOTAL, "reason"),
        shed_rows_by_reason=_by_label(before, after, SHED_TOTAL, "reason"),
        mean_batch_size=rows / calls if calls > 0 else None,
        padding_share=tokens["padding"] / ran if ran > 0 else None,
        model=dict(info),
        restarted=restarted,
    )


def _by_label(before: Samples, after: Samples, name: str, label: str) -> dict[str, float]:
    """A labelled counter's growth per value of `label`, the values that grew only."""
    grown = {dict(labels).get(label, ""): value - before.get(name, {}).get(labels, 0.0) for labels, value in after.get(name, {}).items()}
    return {k: _whole(v) for k, v in grown.items() if v}


def _grown(before: Samples, after: Samples, name: str) -> float:
    """A series' growth over the run, summed over its label sets."""
    return _total(after, name) - _total(before, name)


def _total(samples: Samples, name: str) -> float:
    return _whole(sum(samples.get(name, {}).values()))


def _whole(value: float) -> float:
    """Counts come back as floats; 9.0 reads better as 9 in report.json."""
    return int(value) if float(value).is_integer() else value


def _bucket_counts(before: Samples, after: Samples) -> dict[str, float]:
    """Cumulative `le` buckets (summed over any label sets) -> items per bucket, in layer order."""
    cumulative: dict[float, float] = {}
    for source, sign in ((after, 1.0), (before, -1.0)):
        for labels, value in source.get(EXIT_BUCKET, {}).items():
            le = float(dict(labels)["le"])
            cumulative[le] = cumulative.get(le, 0.0) + sign * value
    counts: dict[str, float] = {}
    previous = 0.0
    for le in sorted(cumulative):
        label = "+Inf" if math.isinf(le) else f"{le:g}"
        if not (math.isinf(le) and cumulative[le] == previous):  # an empty +Inf bucket is no layer
            counts[label] = _whole(cumulative[le] - previous)
        previous = cumulative[le]
    return counts


class MetricsWatch:
    """Scrapes at creation and at finish(); a server without a usable /metrics costs only the server-side numbers."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.before: Samples | None = scrape(url)
            self.problem: str | None = None
        except ScrapeError as err:
            self.before, self.problem = None, str(err)

    def finish(self) -> tuple[ServerDelta | None, str | None]:
        """(the delta over the run, a note for the report when something is off)."""
        if self.before is None:
            return None, f"no server-side exit depth: {self.problem}"
        try:
            server = delta(self.before, scrape(self.url))
        except ScrapeError as err:
            return None, f"no server-side exit depth: {err}"
        return server, "the server restarted during the run: its numbers cover only the time since" if server.restarted else None
