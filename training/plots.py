"""The two pictures people look at: accuracy per exit (like the paper's), and accuracy vs speed-up."""

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


def plot_per_exit(results: dict[str, list[float]], path: Path, title: str, references: dict[str, float] | None = None) -> None:
    """results: method -> accuracy of each exit (fractions); references: name -> one accuracy, dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, accs in results.items():
        ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", label=method)
    for name, acc in (references or {}).items():
        ax.axhline(100 * acc, linestyle="--", color="gray", label=name)
    ax.set_xlabel("exit layer (every sample forced out here)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_speedup(results: dict[str, list[dict[str, Any]]], num_layers: int, path: Path, title: str) -> None:
    """results: method -> sweep rows (threshold, accuracy, avg_exit_layer)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in results.items():
        speedups = [num_layers / r["avg_exit_layer"] for r in rows]
        ax.plot(speedups, [100 * r["accuracy"] for r in rows], marker="o", label=method)
    ax.set_xlabel(f"speed-up (L / average exit layer, L = {num_layers})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
