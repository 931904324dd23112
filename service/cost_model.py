"""What the engine costs, predicted before it runs: a layer (for budgets) and a row (for admission).

The scheduler asks `predict(layer, rows, width)` before running a layer for a cohort and stops the
rows whose remaining budget is smaller; after the layer it reports the measured time with
`observe`. Costs are an EWMA per (layer, batch-size bucket, sequence-length bucket): a layer's
cost moves with load and thermal state, and an average over the recent past follows it without
being thrown by one slow call. Buckets are powers of two; warm-up measures each bucket at its
upper edge, so a first estimate errs on the slow side, which is the safe side for a budget.

`ServiceRate` is the coarser number admission needs: engine seconds per answered row, over the
recent past, early exits and batching included, so the queue's drain time is queue length x it;
and seconds per worker step, how long a row that may jump the queue waits for a layer boundary.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np

from romebert.core.engine import HiddenBatch
from romebert.core.tokenization import Encoded, TokenRow, pad


class CostModel(Protocol):
    def predict(self, layer: int, rows: int, width: int) -> float: ...
    def observe(self, layer: int, rows: int, width: int, seconds: float) -> None: ...


def bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(int(n) - 1, 0).bit_length()


def buckets_up_to(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start`, with the last one clipped to `limit` (the largest real size)."""
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


class EwmaCostModel:
    def __init__(self, num_layers: int, alpha: float = 0.2):
        self.num_layers = num_layers
        self.alpha = alpha
        self._cost: dict[tuple[int, int, int], float] = {}
        self._lock = threading.Lock()  # the scheduler's workers share one model

    def observe(self, layer: int, rows: int, width: int, seconds: float) -> None:
        key = (layer, bucket(rows), bucket(width))
        with self._lock:
            old = self._cost.get(key)
            self._cost[key] = seconds if old is None else old + self.alpha * (seconds - old)

    def predict(self, layer: int, rows: int, width: int) -> float:
        """Seconds layer `layer` (0-based) should take on `rows` rows of `width` tokens.

        An unseen bucket borrows the nearest seen one of the same layer, scaled by the ratio of
        token counts (a layer's work grows about linearly with rows x width at these sizes).
        With nothing seen for the layer the answer is 0: never stop a row on no evidence.
        """
        rows_b, width_b = bucket(rows), bucket(width)
        with self._lock:
            cost = self._cost.get((layer, rows_b, width_b))
            if cost is not None:
                return cost
            seen = [(r, w, c) for (l, r, w), c in self._cost.items() if l == layer]
        if not seen:
            return 0.0
        r, w, c = min(seen, key=lambda s: abs(np.log2(s[0] / rows_b)) + abs(np.log2(s[1] / width_b)))
        return c * (rows_b * width_b) / (r * w)


class ServiceRate:
    """Engine seconds per answered row over the recent past (EWMA over windows of `window` rows),
    and seconds per step (EWMA over steps; 0 until one is seen: no evidence, no wait).

    Not locked: its one writer and readers hold the admission lock.
    """

    def __init__(self, seconds_per_row: float, alpha: float = 0.2, window: int = 32):
        self.seconds_per_row = seconds_per_row
        self.seconds_per_step = 0.0
        self.alpha = alpha
        self.window = window
        self._seconds = 0.0
        self._rows = 0

    def record(self, seconds: float, rows_done: int, stepped: bool = True) -> None:
        """A step took `seconds`, after which `rows_done` rows left (answered or dropped);
        `stepped`: it ran a layer (only such steps are waits for a layer boundary)."""
        if stepped:
            self.seconds_per_step += self.alpha * (seconds - self.seconds_per_step)
        self._seconds += seconds
        self._rows += rows_done
        if self._rows >= self.window:
            sample = self._seconds / self._rows
            self.seconds_per_row += self.alpha * (sample - self.seconds_per_row)
            self._seconds, self._rows = 0.0, 0


class Limit(Protocol):
    """The scheduler's batch limit (cohorts.BatchLimit): the warm-up runs what it lets through."""

    max_rows: int

    def rows_at(self, width: int) -> int: ...
    def padded_shape(self, rows: int, width: int) -> tuple[int, int]: ...


def warm_up(engine, cost_model: CostModel, limit: Limit, max_length: int, min_width: int = 8) -> float:
    """Run every layer once per (rows, width) bucket the server will see, recording each cost.

    This also pays onnxruntime's first-call costs (memory arenas, kernel selection) before the
    first request does; the very first pass is not recorded, since it measures those costs and
    not a layer's. No shape is run that the batch limit keeps the scheduler from running (each
    bucket's rows are cut to it), so the warm-up grows no buffer that serving would not. Returns
    the seconds per row of a full-depth batch of min(32, max_length) tokens, as many rows as the
    limit allows: the first estimate of the service rate, on the slow side (no early exit), until
    traffic measures the real one.
    """
    smallest = min(min_width, max_length)
    _layer_seconds(engine, _dummy_batch(1, smallest))
    # An engine that pads to shape buckets (OpenVINO) lists every shape it will run: each is
    # compiled here, at start, and never on a request.
    grid = getattr(engine, "shapes", lambda *_: None)(limit.max_rows, max_length) or \
        [(rows, width) for rows in buckets_up_to(limit.max_rows) for width in buckets_up_to(max_length, start=smallest)]
    grid = list({(min(rows, limit.padded_shape(limit.rows_at(width), width)[0]), width) for rows, width in grid})
    # Recorded: each cost bucket's largest shape (an engine's finer buckets share the cost model's
    # power-of-two ones), so that a first estimate errs on the slow side; run: every shape.
    shapes = largest_first(grid)
    edges: dict[tuple[int, int], tuple[int, int]] = {}
    for rows, width in shapes:
        edges.setdefault((bucket(rows), bucket(width)), (rows, width))
    recorded = set(edges.values())
    for rows, width in shapes:
        seconds = _layer_seconds(engine, _dummy_batch(rows, width))
        if (rows, width) in recorded:
            for i, layer_seconds in enumerate(seconds):
                cost_model.observe(i, rows, width, layer_seconds)
    typical = min(32, max_length)
    rows = limit.rows_at(typical)
    return sum(cost_model.predict(i, rows, typical) for i in range(engine.num_layers)) / rows


def largest_first(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The warm-up's order. OpenVINO's CPU plugin grows its buffers shape by shape and keeps what it
    outgrew, so warming smallest first leaves the serving process far larger than warming largest
    first, for no speed (docs/results.md, "The serving process's memory")."""
    return sorted(shapes, key=lambda shape: (shape[0] * shape[1], shape), reverse=True)


def _layer_seconds(engine, batch: Encoded) -> list[float]:
    state: HiddenBatch = engine.embed(batch)
    seconds = []
    for i in range(engine.num_layers):
        started = time.perf_counter()
        state, _ = engine.layer(i, state)
        seconds.append(time.perf_counter() - started)
    return seconds


def _dummy_batch(rows: int, width: int) -> Encoded:
    """A batch of the given shape with no padding: the cost of a layer does not depend on the ids."""
    zeros = np.zeros(width, dtype=np.int64)
    return pad([TokenRow(zeros, zeros, False)] * rows)
