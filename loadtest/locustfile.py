"""Locust's own entry point, for load beyond one machine: distributed mode (one master, many workers).

`romebert loadtest` drives Locust as a library in one process, which one CPU core caps at a few
thousand requests/s. For more, run this file with the locust CLI; it takes the same workload flags
(--texts/--dataset, --threshold, --budget-ms, --mix, --batch, --seed), which the master forwards to
its workers:

    # on the master (no users of its own; it aggregates and stops the run)
    locust -f loadtest/locustfile.py --master --headless --expect-workers 4 \\
        -H http://server:8000 -u 400 -r 50 -t 5m --dataset rotten_tomatoes --mix "threshold=0.1:1,budget=20:1"
    # on each load machine (each needs this repo installed with the loadtest extra, and the texts)
    locust -f loadtest/locustfile.py --worker --master-host MASTER_IP

Users run closed loop; --per-user-rate R paces each at R requests/s (open-loop-like, total users x R).
Locust prints its latency percentiles; the master (or a standalone run) also scrapes the server's
/metrics at start and stop and prints the average exit depth over the run.
"""

from __future__ import annotations

import argparse
from typing import Any

from locust import constant, constant_throughput, events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from romebert.loadtest.metrics_scrape import MetricsWatch
from romebert.loadtest.users import ClassifyUser
from romebert.loadtest.workload import add_workload_arguments, workload_from_args

_watch: MetricsWatch | None = None


class RomebertUser(ClassifyUser):
    """Its workload and pacing are set at test start, from the parsed options."""

    abstract = False


@events.init_command_line_parser.add_listener
def _add_flags(parser: argparse.ArgumentParser, **_: Any) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--per-user-rate", type=float, default=0.0, help="requests/s per user (0: back to back)")


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    global _watch
    options = environment.parsed_options
    if not isinstance(environment.runner, MasterRunner):  # only processes that run users need the texts
        RomebertUser.workload = workload_from_args(options)
        RomebertUser.wait_time = constant_throughput(options.per_user_rate) if options.per_user_rate > 0 else constant(0)
    if not isinstance(environment.runner, WorkerRunner):
        _watch = MetricsWatch(f"{environment.host.rstrip('/')}/metrics")


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    if _watch is None or isinstance(environment.runner, WorkerRunner):
        return
    server, note = _watch.finish()
    if server is None or server.average_exit_layer is None:
        print(f"exit depth: {note or 'no items answered during the run'}")
        return
    shares = ", ".join(f"L{layer}: {count / server.items:.1%}" for layer, count in server.exit_layers.items())
    print(f"exit depth: average layer {server.average_exit_layer:.3f} over {server.items:g} items ({shares})")
