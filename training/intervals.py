"""Uncertainty on accuracies: bootstrap intervals, paired differences, and the early-exit figure of merit.

853 test examples give an accuracy a 95% interval of about +-2.5 points, so a difference of a
point between two single runs tells nothing; a paired comparison (the same examples resampled for
both models) is much tighter, because most examples are right or wrong for both. Every
interval here is a percentile bootstrap over examples (2,000 resamples, seeded).
"""

from __future__ import annotations

import numpy as np

from romebert.core.exits import THRESHOLD_GRID, entropy, exit_layers

RESAMPLES = 2000
LEVEL = 0.95


def _bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    """The percentile interval of the mean of per-example `values`, the examples resampled."""
    resamples = np.random.default_rng(seed).integers(0, len(values), size=(RESAMPLES, len(values)))
    lo, hi = np.quantile(values[resamples].mean(axis=1), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def interval(correct: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Accuracy of a 0/1 vector with its 95% bootstrap interval."""
    correct = np.asarray(correct, dtype=np.float64)
    lo, hi = _bootstrap(correct, seed)
    return {"accuracy": float(correct.mean()), "lo": lo, "hi": hi}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Accuracy of a minus accuracy of b on the same examples, with its 95% paired bootstrap interval."""
    diff = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    lo, hi = _bootstrap(diff, seed)
    return {"difference": float(diff.mean()), "lo": lo, "hi": hi}


def correct_at(per_exit_logits: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """Which examples the entropy rule gets right at `threshold`, and the average exit layer."""
    layers = exit_layers(per_exit_logits, threshold)
    predictions = per_exit_logits.argmax(-1)[layers - 1, np.arange(len(labels))]
    return predictions == labels, float(layers.mean())


def fine_grid(dev_logits: np.ndarray) -> np.ndarray:
    """The thresholds a curve is read at: the paper's, 200 more evenly up to ln(labels), and one
    just above each of 1,000 quantiles of the early exits' entropies on these logits. The last
    matter where the entropies crowd together, as on IMDB, whose first exits sit within 0.01 of
    ln 2: an even grid there jumps from nobody leaving to everybody, and the speed-up asked for is
    met only by sending every row out at exit 1."""
    early = entropy(dev_logits[:-1]).ravel()
    crowded = np.nextafter(np.quantile(early, np.linspace(0.0, 1.0, 1001)), np.inf) if early.size else []
    even = np.linspace(0.0, np.log(dev_logits.shape[-1]), 201)
    return np.unique(np.concatenate([THRESHOLD_GRID, even, crowded]))


def threshold_for_speedup(dev_logits: np.ndarray, dev_labels: np.ndarray, speedup: float) -> float | None:
    """On DEV: the threshold with the best accuracy among those reaching `speedup` (L / avg exit
    layer); None when none does. Test is then read at this threshold."""
    num_layers = dev_logits.shape[0]
    grid = fine_grid(dev_logits)
    best = None
    for t in grid:
        correct, avg = correct_at(dev_logits, dev_labels, t)
        if num_layers / avg >= speedup and (best is None or correct.mean() > best[1]):
            best = (t, correct.mean())
    return None if best is None else float(best[0])
