"""The early-exit rule, in numpy, shared by the server, the export calibration and evaluation.

One implementation (`confident`) so that the exit layer the server picks, the one calibration
measured and the one `romebert evaluate` reports cannot drift apart.
"""

from __future__ import annotations

import numpy as np

# Thresholds (nats) used by DeeBERT and RomeBERT for their speed/accuracy curves.
THRESHOLD_GRID: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def softmax_entropy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits) over the last axis (float64) and its entropy in nats, from one exp: the
    server answers with the probabilities of the exit whose entropy let the row leave.

    The entropy is written as log(sum e^z) - sum(p * z) after subtracting the max, so it neither
    overflows on large logits nor turns into NaN where a probability underflows to 0
    (-sum p log p does).
    """
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1, keepdims=True)  # >= 1: the max's own term is e^0
    p = e / total
    return p, np.maximum(np.log(total[..., 0]) - (p * z).sum(axis=-1), 0.0)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in nats of softmax(logits) over the last axis (see softmax_entropy)."""
    return softmax_entropy(logits)[1]


def confident(entropies: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """THE exit rule: a row leaves at an exit whose entropy is strictly below its own threshold."""
    return entropies < thresholds


def can_leave_early(thresholds: np.ndarray) -> bool:
    """Whether any of these thresholds lets a row leave before the last exit. Entropy is never
    negative, so threshold 0 never does; skipping the test then saves about an exit head's cost
    per layer at batch 1 (docs/results.md)."""
    return bool((np.asarray(thresholds) > 0).any())


def exit_layers(per_exit_logits: np.ndarray, threshold: float) -> np.ndarray:
    """1-based exit layer of each sample: the first exit with entropy strictly below `threshold`.

    `per_exit_logits` has shape (L, N, C). Samples with no confident exit leave at L;
    threshold 0 therefore means full depth.
    """
    leaves = confident(entropy(per_exit_logits), threshold)  # (L, N)
    leaves[-1] = True
    return leaves.argmax(axis=0) + 1


def sweep(
    per_exit_logits: np.ndarray, labels: np.ndarray, thresholds: tuple[float, ...] = THRESHOLD_GRID
) -> list[dict[str, float]]:
    """Accuracy and average exit layer at each threshold, from logits of every exit."""
    num_layers, n, _ = per_exit_logits.shape
    predictions = per_exit_logits.argmax(axis=-1)  # (L, N)
    rows = []
    for t in thresholds:
        layers = exit_layers(per_exit_logits, t)
        chosen = predictions[layers - 1, np.arange(n)]
        avg = float(layers.mean())
        rows.append(
            {
                "threshold": float(t),
                "accuracy": float((chosen == labels).mean()),
                "avg_exit_layer": avg,
                "speedup": num_layers / avg,
            }
        )
    return rows
