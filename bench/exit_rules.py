"""The exit rules compared on one curve, accuracy against speed-up, on dev: entropy (the paper's),
entropy after per-exit temperature calibration, and PABEE's patience. Used by the recipe search
(one seed per recipe) and the training benchmark (every seed of the shipped recipe), so that the
server's rule is chosen on more than one run."""

from __future__ import annotations

import numpy as np

from romebert.training.intervals import correct_at, fine_grid, reaches


def at_speedup(curve: list[tuple[float, float]], speedup: float) -> float | None:
    """Accuracy at the curve's least aggressive point (speed-up, accuracy) reaching `speedup`, the
    rule intervals.threshold_for_speedup follows on the entropy curve."""
    reached = [(s, acc) for s, acc in curve if reaches(s, speedup)]
    return min(reached, key=lambda p: (p[0], -p[1]))[1] if reached else None


def entropy_curve(logits: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    points = [correct_at(logits, labels, t) for t in fine_grid(logits)]
    return [(logits.shape[0] / avg, float(c.mean())) for c, avg in points]


def patience_curve(logits: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """PABEE: leave at the first exit where the prediction has stayed the same for `patience`
    consecutive exits (so never before exit patience + 1); else at the last."""
    num_layers, n = logits.shape[:2]
    preds = logits.argmax(-1)
    curve = []
    for patience in range(1, num_layers):
        layers = np.full(n, num_layers)
        streak = np.zeros(n, dtype=int)
        for i in range(1, num_layers):
            streak = np.where(preds[i] == preds[i - 1], streak + 1, 0)
            leaving = (streak >= patience) & (layers == num_layers)
            layers[leaving] = i + 1
        chosen = preds[layers - 1, np.arange(n)]
        curve.append((num_layers / layers.mean(), float((chosen == labels).mean())))
    return curve


def temperatures(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per exit, the temperature that minimises the negative log-likelihood (grid search)."""
    grid = np.geomspace(0.05, 20, 200)

    def nll(z: np.ndarray) -> float:
        z = z - z.max(-1, keepdims=True)
        return float((np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]).mean())

    return np.array([min(grid, key=lambda t: nll(z / t)) for z in logits])


def calibrated_curve(logits: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """The entropy rule on temperature-scaled exits, cross-fitted: temperatures fitted on one half
    of dev, the curve read on the other, and the two halves' curves averaged point by point."""
    halves = np.array_split(np.random.default_rng(0).permutation(len(labels)), 2)
    curves = []
    for fit, read in (halves, halves[::-1]):
        scaled = logits[:, read] / temperatures(logits[:, fit], labels[fit])[:, None, None]
        curves.append(entropy_curve(scaled, labels[read]))
    return [((s1 + s2) / 2, (a1 + a2) / 2) for (s1, a1), (s2, a2) in zip(*curves)]
