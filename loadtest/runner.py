"""Run Locust headless, in this process, until the duration or the request budget is spent.

Locust is a library here (Environment + LocalRunner), so the tool owns the stop conditions and the
records. Past one machine's worth of load, use Locust's own distributed mode with
loadtest/locustfile.py (see its docstring).
"""

from __future__ import annotations

import math
import time

import gevent
from locust.env import Environment

from romebert.loadtest.records import RunResult
from romebert.loadtest.users import ClassifyUser, Gate, Recorder
from romebert.loadtest.workload import Workload

# Locust warns that spawning faster than this "sometimes causes issues"; more users ramp up over seconds.
MAX_SPAWN_RATE = 100
DEFAULT_USERS = 4


def pool_size(users: int | None, rate: float | None) -> int:
    """Closed loop: the users asked for (default DEFAULT_USERS). Open loop: enough idle users to keep
    the schedule while latency stays under a second (one per request/s), unless --users says otherwise."""
    if users is not None:
        return users
    return max(1, math.ceil(rate)) if rate else DEFAULT_USERS


def run_load(url: str, workload: Workload, users: int, rate: float | None, duration_s: float,
             max_requests: int | None, timeout_s: float) -> RunResult:
    recorder = Recorder()
    gate = Gate(max_requests, rate)
    user_class = type("RomebertUser", (ClassifyUser,), {
        "abstract": False, "host": url, "workload": workload, "gate": gate, "recorder": recorder,
        "network_timeout": timeout_s, "connection_timeout": timeout_s,
    })
    env = Environment(user_classes=[user_class], host=url)
    runner = env.create_local_runner()
    started = recorder.t0
    runner.start(users, spawn_rate=min(users, MAX_SPAWN_RATE))
    deadline = started + duration_s
    while time.perf_counter() < deadline and not gate.spent:
        gevent.sleep(0.01)
    stop_reason = "max-requests" if gate.spent else "duration"
    elapsed = time.perf_counter() - started
    runner.quit()
    return RunResult(recorder.records, elapsed, stop_reason, gate.issued - len(recorder.records))
