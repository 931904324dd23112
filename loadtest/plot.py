"""report.png: the latency histogram beside the exit-layer distribution, the two sides of early exit's trade."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)


def plot_report(path: Path, latencies_ms: Sequence[float], report: dict[str, Any]) -> None:
    """Write the figure to `path` (a temporary file the caller renames into place)."""
    fig, (lat_ax, exit_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        _latency(lat_ax, latencies_ms, report["latency_ms"])
        _exits(exit_ax, report["exit_depth"])
        fig.suptitle(f"{report['config']['url']}: {report['requests']['completed']} requests, batch {report['config']['batch']}")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _latency(ax: Any, latencies_ms: Sequence[float], summary: dict[str, float] | None) -> None:
    ax.set_title("client latency (successful requests)")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    if not latencies_ms or summary is None:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(latencies_ms, bins=min(50, max(5, len(latencies_ms) // 5)), color="tab:blue", alpha=0.8)
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax.axvline(summary[key], color="black", linestyle=style, label=f"{key} {summary[key]:.1f} ms")
    ax.legend()


def _exits(ax: Any, exit_depth: dict[str, Any]) -> None:
    ax.set_title(f"exit layer ({exit_depth['source']})")
    ax.set_xlabel("exit layer")
    ax.set_ylabel("share of items")
    layers = exit_depth["exit_layers"]
    total = sum(layers.values())
    if not total:
        ax.text(0.5, 0.5, "no answered items", ha="center", va="center", transform=ax.transAxes)
        return
    ax.bar(list(layers), [v / total for v in layers.values()], color="tab:green")
    ax.text(0.98, 0.95, f"average {exit_depth['average_exit_layer']:.2f}", ha="right", va="top", transform=ax.transAxes)
