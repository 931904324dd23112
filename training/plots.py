"""The two pictures people look at: accuracy per exit (like the paper's), and accuracy vs speed-up.

Each curve may carry a band (`lo`, `hi`): a 95% interval for one run, the spread over seeds for
several, so that curves inside each other's noise look like it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from romebert.core.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_per_exit(results: dict[str, dict[str, list[float]]], path: Path, title: str, references: dict[str, dict[str, float]] | None = None) -> None:
    """results: method -> {"accuracy": per exit (fractions), optional "lo"/"hi"}; references:
    name -> {"accuracy", optional "lo"/"hi"}, one accuracy drawn dashed across (with its band)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in results.items():
        exits = range(1, len(curve["accuracy"]) + 1)
        (line,) = ax.plot(exits, [100 * a for a in curve["accuracy"]], marker="o", label=method)
        if "lo" in curve:
            ax.fill_between(exits, [100 * a for a in curve["lo"]], [100 * a for a in curve["hi"]], color=line.get_color(), alpha=0.2)
    for name, ref in (references or {}).items():
        ax.axhline(100 * ref["accuracy"], linestyle="--", color="gray", label=name)
        if "lo" in ref:
            ax.axhspan(100 * ref["lo"], 100 * ref["hi"], color="gray", alpha=0.12)
    ax.set_xlabel("exit layer (every sample forced out here)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_speedup(results: dict[str, list[dict[str, Any]]], num_layers: int, path: Path, title: str,
                 points: dict[str, list[dict[str, float]]] | None = None) -> None:
    """results: method -> sweep rows (accuracy, avg_exit_layer, optional lo/hi). points: method ->
    operating points (speedup, accuracy, and their spreads speedup_err, accuracy_err), drawn as
    error bars in the method's colour: where a sweep's shared thresholds jump over a region (exit
    entropies crowded together), the curve alone would draw a straight line through it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for method, rows in results.items():
        rows = sorted(rows, key=lambda r: -r["avg_exit_layer"])
        speedups = [num_layers / r["avg_exit_layer"] for r in rows]
        (line,) = ax.plot(speedups, [100 * r["accuracy"] for r in rows], marker="o", label=method)
        colours[method] = line.get_color()
        if all("lo" in r for r in rows):
            ax.fill_between(speedups, [100 * r["lo"] for r in rows], [100 * r["hi"] for r in rows], color=line.get_color(), alpha=0.2)
    for method, marks in (points or {}).items():
        ax.errorbar([m["speedup"] for m in marks], [100 * m["accuracy"] for m in marks], xerr=[m["speedup_err"] for m in marks],
                    yerr=[100 * m["accuracy_err"] for m in marks], fmt="D", color=colours.get(method), markeredgecolor="black", capsize=3,
                    label=f"{method}, threshold chosen on dev")
    ax.set_xlabel(f"speed-up (L / average exit layer, L = {num_layers})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
