"""The calibration table and the default threshold, measured through ONNX Runtime on held-out data."""

from __future__ import annotations

import math

import numpy as np

from romebert.core.engine import Engine
from romebert.core.exits import sweep
from romebert.core.tokenization import LengthBatches


def exit_logits_onnx(engine: Engine, split: LengthBatches) -> np.ndarray:
    """(L, N, C) logits of every exit for every row of the split, in split order."""
    return split.in_split_order(engine.all_exit_logits(b) for b in split.batches)


def choose_threshold(table: list[dict], max_drop_points: float, num_labels: int) -> dict:
    """The largest speed-up whose accuracy stays within `max_drop_points` of full depth (threshold 0).

    Only thresholds up to ln(num_labels) are candidates: entropy never exceeds it, the API refuses
    larger ones, and the default must be a threshold a client could also send.
    """
    full = next(r for r in table if r["threshold"] == 0.0)
    ceiling = math.log(num_labels)
    allowed = [r for r in table if r["threshold"] <= ceiling and r["accuracy"] >= full["accuracy"] - max_drop_points / 100]
    best = max(allowed, key=lambda r: (r["speedup"], -r["threshold"]))
    return {"threshold": best["threshold"], "rule": f"largest speed-up with dev accuracy within {max_drop_points} points of full depth"}


def calibrate(logits: np.ndarray, labels: np.ndarray, max_drop_points: float) -> tuple[list[dict], dict]:
    table = sweep(logits, labels)
    return table, choose_threshold(table, max_drop_points, logits.shape[-1])
