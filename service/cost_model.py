"""What one encoder layer costs, predicted before it runs, so latency budgets are kept by prediction.

The scheduler asks `predict(layer, rows, width)` before running a layer for a cohort and stops the
rows whose remaining budget is smaller; after the layer it reports the measured time with
`observe`. Costs are an EWMA per (layer, batch-size bucket, sequence-length bucket): a layer's
cost moves with load and thermal state, and an average over the recent past follows it without
being thrown by one slow call. Buckets are powers of two; warm-up measures each bucket at its
upper edge, so a first estimate errs on the slow side, which is the safe side for a budget.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np

from romebert.core.engine import HiddenBatch
from romebert.core.tokenization import Encoded


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


def warm_up(engine, cost_model: CostModel, max_batch: int, max_length: int, min_width: int = 8) -> int:
    """Run every layer once per (rows, width) bucket the server will see, recording each cost.

    This also pays onnxruntime's first-call costs (memory arenas, kernel selection) before the
    first request does; the very first pass is not recorded, since it measures those costs and
    not a layer's. Returns the number of grid points measured.
    """
    smallest = min(min_width, max_length)
    _layer_seconds(engine, _dummy_batch(1, smallest))
    grid = [(rows, width) for rows in buckets_up_to(max_batch) for width in buckets_up_to(max_length, start=smallest)]
    for rows, width in grid:
        for i, seconds in enumerate(_layer_seconds(engine, _dummy_batch(rows, width))):
            cost_model.observe(i, rows, width, seconds)
    return len(grid)


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
    ids = np.zeros((rows, width), dtype=np.int64)
    return Encoded(ids, np.ones_like(ids), np.zeros_like(ids), np.zeros(rows, dtype=bool), np.full(rows, width, dtype=np.int64))
