"""`romebert loadtest URL`: drive a running server, report, and judge the run against SLOs.

Exit status: 0 the run met every SLO given, 1 an SLO was missed (each miss is printed with its
margin), 2 bad arguments, unusable texts, or a server that cannot be reached or is not ready, 130
a second Ctrl+C (the first ends the run early, with its report: driver.py; the second is the
`romebert` command's usual interrupt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

from romebert.loadtest.workload import add_workload_arguments, workload_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="romebert loadtest",
        description="Drive a running romebert server (asyncio + aiohttp, one process) and report latency, throughput and exit depth. "
        "For more load than one machine makes, run Locust's distributed mode with loadtest/locustfile.py.",
    )
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    load = p.add_argument_group("load (closed loop by default)")
    load.add_argument("--users", type=int, default=None,
                      help="concurrent users (closed loop: each sends its next request when the last one returns; default 4). "
                      "With --rate: the most requests in flight (default: one per request/s, at most 2000); "
                      "a send that finds them all busy is skipped and counted as unsent")
    load.add_argument("--rate", type=float, default=None, help="open loop: a constant arrival rate of R requests/s, whatever the latency")
    load.add_argument("--duration", type=float, default=30.0, help="stop after S seconds (default 30)")
    load.add_argument("--max-requests", type=int, default=None, help="stop after N requests (whichever of --duration and this comes first)")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    load.add_argument("--honour-retry-after", action="store_true",
                      help="closed loop: a user answered 429 or 503 waits the answer's Retry-After before its next request, "
                      "as a well-behaved client does (default: it resends at once, the most load a user makes)")
    add_workload_arguments(p)
    out = p.add_argument_group("output and SLOs")
    out.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="folder for report.json, requests.csv and report.png")
    out.add_argument("--metrics-url", default=None, help="Prometheus endpoint scraped before and after the run (default: URL/metrics)")
    out.add_argument("--slo-p99-ms", type=float, default=None, help="fail (exit 1) when the p99 latency of successful requests exceeds this")
    out.add_argument("--slo-error-rate", type=float, default=None,
                     help="fail (exit 1) when the fraction of failed requests exceeds this (0.01 = 1%%)")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, ok in (
        ("--users", args.users, args.users is None or args.users >= 1),
        ("--rate", args.rate, args.rate is None or args.rate > 0),
        ("--duration", args.duration, args.duration > 0),
        ("--max-requests", args.max_requests, args.max_requests is None or args.max_requests >= 1),
        ("--timeout", args.timeout, args.timeout > 0),
        ("--slo-p99-ms", args.slo_p99_ms, args.slo_p99_ms is None or args.slo_p99_ms > 0),
        ("--slo-error-rate", args.slo_error_rate, args.slo_error_rate is None or 0 <= args.slo_error_rate <= 1),
    ):
        if not ok:
            p.error(f"{flag}: invalid value {value}")
    if args.honour_retry_after and args.rate is not None:
        p.error("--honour-retry-after is for the closed loop: with --rate, arrivals do not wait for answers")
    if not args.url.startswith(("http://", "https://")):
        p.error(f"url must start with http:// or https://, got {args.url!r}")
    parts = urlsplit(args.url)
    if parts.path.rstrip("/"):  # the routes are asked for by their own paths, from the host's root
        p.error(f"url is the server's base URL, without a path: '{parts.scheme}://{parts.netloc}', not {args.url!r}")


def _ready(url: str, timeout_s: float) -> str | None:
    """None when GET /readyz answers 200, else why the server cannot be tested."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout_s):
            return None
    except urllib.error.HTTPError as err:
        return f"server at {url} is not ready (GET /readyz: HTTP {err.code})"
    except (urllib.error.URLError, OSError) as err:
        return f"cannot reach server at {url}: {getattr(err, 'reason', err)}"


def main(command: str, argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    url = args.url.rstrip("/")
    from romebert.loadtest.driver import pool_size, run_load

    try:
        workload = workload_from_args(args)
    except ValueError as err:  # TextsError included
        print(f"romebert {command}: error: {err}", file=sys.stderr)
        return 2
    problem = _ready(url, min(args.timeout, 10.0))
    if problem:
        print(f"romebert {command}: error: {problem}", file=sys.stderr)
        return 2

    from romebert.loadtest.artifacts import write_artifacts
    from romebert.loadtest.metrics_scrape import MetricsWatch
    from romebert.loadtest.report import build_report, format_table
    from romebert.loadtest.slo import check_slos

    users = pool_size(args.users, args.rate)
    watch = MetricsWatch(args.metrics_url or f"{url}/metrics")
    run = run_load(url, workload, users, args.rate, args.duration, args.max_requests, args.timeout,
                   honour_retry_after=args.honour_retry_after)
    server, note = watch.finish()
    config = {
        "url": url, "users": users, "rate": args.rate, "duration_s": args.duration, "max_requests": args.max_requests,
        "honour_retry_after": args.honour_retry_after,
        "batch": workload.batch, "timeout_s": args.timeout, "seed": workload.seed, "metrics_url": watch.url,
        "texts": str(args.texts) if args.texts else (args.dataset or "rotten_tomatoes"), "n_texts": len(workload.texts),
        "profiles": [{"name": p.name, "overrides": p.overrides, "weight": p.weight} for p in workload.profiles],
    }
    report = build_report(config, run, server, note)
    report["slo"] = check_slos(report, args.slo_p99_ms, args.slo_error_rate)
    paths = write_artifacts(args.out, report, run.records)
    print(format_table(report))
    for objective in report["slo"]["objectives"]:
        print(f"  {'SLO':<13}{objective['name']} target {objective['target']:g}: {'met' if objective['met'] else 'MISSED'}")
    print(f"  {'written':<13}" + ", ".join(str(p) for p in paths))
    for miss in report["slo"]["misses"]:
        print(f"romebert {command}: {miss}", file=sys.stderr)
    return 1 if report["slo"]["misses"] else 0
