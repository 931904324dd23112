"""The numbers of a run (report.json) and the table printed at the end.

Latency percentiles are over the successful requests: a fast 429/503 would otherwise make an
overloaded server look quick; for the same reason throughput counts answered (2xx) requests and
items only. Failures are reported (and bounded by --slo-error-rate) on their own.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import numpy as np

from romebert.loadtest.metrics_scrape import ServerDelta
from romebert.loadtest.records import RequestRecord, RunResult

PERCENTILES = (50, 95, 99)


def build_report(config: dict[str, Any], run: RunResult, server: ServerDelta | None, server_note: str | None) -> dict[str, Any]:
    records = run.records
    ok = [r for r in records if r.ok]
    items_ok = sum(r.items for r in ok)
    report: dict[str, Any] = {
        "config": config,
        "run": {"elapsed_s": run.elapsed_s, "stop_reason": run.stop_reason, "abandoned": run.abandoned, "unsent": run.unsent},
        "requests": {
            "completed": len(records),
            "ok": len(ok),
            "failed": len(records) - len(ok),
            "error_rate": (len(records) - len(ok)) / len(records) if records else None,
            "by_status": _count(str(r.status) for r in records),
            "errors": _count(r.error for r in records if r.error),
            "error_messages": _first_messages(records),
        },
        "throughput": {
            "requests_per_s": len(ok) / run.elapsed_s if run.elapsed_s > 0 else 0.0,
            "items_per_s": items_ok / run.elapsed_s if run.elapsed_s > 0 else 0.0,
        },
        "latency_ms": latency_summary([r.latency_ms for r in ok]),
        "server_latency_ms": latency_summary([r.server_latency_ms for r in ok if r.server_latency_ms is not None]),
        "exit_depth": _exit_depth(server, server_note, exit_summary(ok)),
        "profiles": {name: _profile_summary([r for r in records if r.profile == name]) for name in sorted({r.profile for r in records})},
    }
    if config.get("rate"):
        achieved = _arrival_rate([r.start_s for r in records])
        lag = latency_summary([r.lag_ms for r in records])
        report["schedule"] = {
            "target_rate": config["rate"],
            "achieved_rate": achieved,
            "lag_ms": lag,
            "unsent": run.unsent,
            # the load the server saw: within 5% of the target, nothing skipped
            "rate_reached": bool(achieved is not None and achieved >= 0.95 * config["rate"] and not run.unsent),
            # its shape: sends at most one interval (+ 1 ms) late at p99, so no bursts beyond one request
            "on_time": bool(lag is not None and lag["p99"] <= 1000 / config["rate"] + 1.0),
        }
    return report


def _arrival_rate(starts: Sequence[float]) -> float | None:
    """Sends per second between the first and the last send: n requests span n - 1 intervals."""
    span = max(starts) - min(starts) if len(starts) > 1 else 0.0
    return (len(starts) - 1) / span if span > 0 else None


def latency_summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    summary = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    return summary | {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}


def exit_summary(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Exit depth as the answers reported it: the client-side check on the server's histogram."""
    layers = [layer for r in records for layer in r.exit_layers]
    return {
        "items": len(layers),
        "average_exit_layer": sum(layers) / len(layers) if layers else None,
        "exit_layers": {str(k): v for k, v in sorted(Counter(layers).items())},
        "budget_exhausted": sum(r.budget_exhausted for r in records),
        "truncated": sum(r.truncated for r in records),
    }


def _exit_depth(server: ServerDelta | None, server_note: str | None, responses: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers come from the server's histogram when it counted items, else from the answers."""
    use_server = server is not None and server.items > 0
    headline = dataclasses.asdict(server) if use_server else responses
    return {
        "source": "server /metrics" if use_server else "responses",
        "average_exit_layer": headline["average_exit_layer"],
        "items": headline["items"],
        "exit_layers": headline["exit_layers"],
        "server": dataclasses.asdict(server) if server else None,
        "server_note": server_note,
        "responses": responses,
    }


def _profile_summary(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    exits = exit_summary(ok)
    latency = latency_summary([r.latency_ms for r in ok]) or {}
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "average_exit_layer": exits["average_exit_layer"],
        "budget_exhausted": exits["budget_exhausted"],
        "over_budget": _over_budget(ok),
    }


def _over_budget(records: Sequence[RequestRecord]) -> float | None:
    """Share of the budgeted requests the server answered after their budget (its own latency_ms,
    which is what the budget bounds); None when none carried a budget."""
    timed = [r for r in records if r.budget_ms is not None and r.server_latency_ms is not None]
    return sum(r.server_latency_ms > r.budget_ms for r in timed) / len(timed) if timed else None


def _first_messages(records: Sequence[RequestRecord]) -> dict[str, str]:
    """The server's message for the first failure of each error code: why a run failed, without
    sending a request by hand (a threshold above the bundle's ceiling fails every request alike)."""
    first: dict[str, str] = {}
    for r in records:
        if r.error and r.error_message and r.error not in first:
            first[r.error] = r.error_message
    return dict(sorted(first.items()))


def _count(keys: Any) -> dict[str, int]:
    return dict(sorted(Counter(keys).items()))


def format_table(report: dict[str, Any]) -> str:
    """A human-readable summary; report.json has everything."""
    cfg, req, run = report["config"], report["requests"], report["run"]
    load = f"open loop, {cfg['rate']:g} req/s over {cfg['users']} users" if cfg.get("rate") else f"closed loop, {cfg['users']} users"
    lines = [
        f"romebert load test of {cfg['url']}: {load}, batch {cfg['batch']}",
        f"  {'run':<13}{run['elapsed_s']:.2f} s, stopped by {run['stop_reason']}"
        + (f", {run['abandoned']} requests abandoned at the deadline" if run["abandoned"] else ""),
        f"  {'requests':<13}{req['completed']} completed, {req['ok']} ok, {req['failed']} failed"
        + (f" ({100 * req['error_rate']:.2f}%)" if req["error_rate"] else ""),
    ]
    if req["failed"]:
        lines.append(f"  {'by status':<13}" + ", ".join(f"{k}: {v}" for k, v in req["by_status"].items()))
        lines.append(f"  {'errors':<13}" + ", ".join(f"{k}: {v}" for k, v in req["errors"].items()))
        lines += [f"  {'':<13}{code}, first: {_clipped(message)}" for code, message in req["error_messages"].items()]
    tp = report["throughput"]
    lines.append(f"  {'throughput':<13}{tp['requests_per_s']:.1f} req/s, {tp['items_per_s']:.1f} items/s")
    if "schedule" in report:
        sched = report["schedule"]
        lag = sched["lag_ms"] or {}
        lines.append(f"  {'schedule':<13}target {sched['target_rate']:g} req/s, achieved {_num(sched['achieved_rate'])}, "
                     f"send lag p99 {_num(lag.get('p99'))} ms, {sched['unsent']} unsent")
        if not sched["rate_reached"]:
            lines.append(f"  {'':<13}WARNING: the target rate was NOT reached: too few connections for the latency (raise --users) "
                         "or a saturated load generator; the server saw less load than asked for")
        elif not sched["on_time"]:
            lines.append(f"  {'':<13}note: sends ran late (p99 {_num(lag.get('p99'))} ms, over one interval of {1000 / sched['target_rate']:.3g} ms): "
                         "the generator was short of CPU at moments and sent in bursts; the rate held on average")
    for key, title in (("latency_ms", "latency ms"), ("server_latency_ms", "server ms")):
        lat = report[key]
        if lat:
            lines.append(f"  {title:<13}" + "  ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p95", "p99", "max")))
    lines += _exit_lines(report["exit_depth"])
    if len(report["profiles"]) > 1:
        lines.append(f"  {'by profile':<13}{'profile':<22}{'requests':>9}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'avg exit':>9}"
                     f"{'budget cut':>11}{'over budget':>12}")
        for name, p in report["profiles"].items():
            numbers = "".join(f"{_num(p[k]):>9}" for k in ("p50_ms", "p99_ms", "average_exit_layer"))
            over = "" if p["over_budget"] is None else f"{100 * p['over_budget']:.1f}%"
            lines.append(f"  {'':<13}{name:<22}{p['requests']:>9}{p['failed']:>8}{numbers}{p['budget_exhausted']:>11}{over:>12}")
    return "\n".join(lines)


def _exit_lines(exit_depth: dict[str, Any]) -> list[str]:
    lines = [f"  {'metrics':<13}{exit_depth['server_note']}"] if exit_depth["server_note"] else []
    if exit_depth["average_exit_layer"] is None:
        return lines + [f"  {'exit depth':<13}no answered items"]
    total = sum(exit_depth["exit_layers"].values())
    lines.append(f"  {'exit depth':<13}average layer {exit_depth['average_exit_layer']:.3f} "
                 f"over {exit_depth['items']:g} items ({exit_depth['source']})")
    lines.append(f"  {'exit layers':<13}" + "  ".join(f"L{k}: {100 * v / total:.1f}%" for k, v in exit_depth["exit_layers"].items()))
    server = exit_depth["server"] or {}
    if server.get("mean_batch_size") is not None:
        padding = "" if server.get("padding_share") is None else f", {100 * server['padding_share']:.0f}% of their token positions padding"
        lines.append(f"  {'engine':<13}{server['mean_batch_size']:.1f} rows per layer call on average{padding}")
    for key, label, unit in (("rejected_by_reason", "refused", "requests"), ("shed_rows_by_reason", "shed", "rows")):
        if server.get(key):
            lines.append(f"  {label:<13}" + ", ".join(f"{k}: {v:g}" for k, v in server[key].items()) + f" {unit} (server /metrics)")
    return lines


def _clipped(message: str, width: int = 160) -> str:
    return message if len(message) <= width else message[: width - 3] + "..."


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
