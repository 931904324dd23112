"""Service-level objectives: a load test that CI can fail on, saying which objective missed and by how much."""

from __future__ import annotations

from typing import Any


def check_slos(report: dict[str, Any], p99_ms: float | None, error_rate: float | None) -> dict[str, Any]:
    """{"objectives": [...], "misses": [message, ...]}; no objective set means nothing can miss."""
    objectives, misses = [], []
    if p99_ms is not None:
        actual = (report["latency_ms"] or {}).get("p99")
        met = actual is not None and actual <= p99_ms
        objectives.append({"name": "p99_ms", "target": p99_ms, "actual": actual, "met": met})
        if actual is None:
            misses.append(f"p99 latency SLO ({p99_ms:g} ms) missed: no successful request to measure")
        elif not met:
            misses.append(f"p99 latency SLO missed: p99 {actual:.3f} ms > {p99_ms:g} ms (over by {actual - p99_ms:.3f} ms)")
    if error_rate is not None:
        actual = report["requests"]["error_rate"]
        met = actual is not None and actual <= error_rate
        objectives.append({"name": "error_rate", "target": error_rate, "actual": actual, "met": met})
        if actual is None:
            misses.append(f"error-rate SLO ({error_rate:g}) missed: no request completed")
        elif not met:
            misses.append(f"error-rate SLO missed: {actual:.4f} > {error_rate:g} (over by {actual - error_rate:.4f};"
                          f" {report['requests']['failed']} of {report['requests']['completed']} requests failed)")
    return {"objectives": objectives, "misses": misses}
