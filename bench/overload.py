"""Overload benchmark (this CPU): capacity, then 2x and 4x that offered open loop, then slow clients.

Real bundle, texts from the rotten_tomatoes test split, one text per request at the bundle's
default threshold, the server's default settings, `romebert loadtest`'s driver (asyncio + aiohttp,
in this process: it shares the server's two cores, as it would on a small host).

1. Capacity: closed loop, 32 concurrent users, 30 s.
2. Open loop at 2x and 4x that capacity, 60 s each (arrivals on a fixed schedule whatever the
   latency): goodput (answers with status 200 per second), latency of the admitted requests,
   every status, the server's RSS before and after, whether the generator held the rate, and from
   the server's /metrics why it refused and how many rows its engine calls carried. Every step
   records the cores the server process and the generator (this process) used, and the server's
   CPU per answer: on two shared cores, where the capacity lost past capacity goes.
3. 500 connections that send their headers and part of a body, then stall (each reconnects when
   the server closes it), during a closed loop of 16 users for 30 s; against the same loop
   without them, and /healthz polled every 20 ms in both.

With --also FLAGS (repeatable), the same server started with those flags runs steps 1 and 2 too,
at 2x and 4x its own capacity (how another configuration, such as docker-compose.cpu.yml's two
workers or `--spin off`, holds).
With --pin, every server runs on all cores but the last and the load generator (this process, its
slow clients too) on the last one: the servers' behaviour past capacity without the generator
taking their cores, which the shared-core runs cannot separate from it.
With --before PATH (a checkout of an older commit, e.g. `git worktree add /tmp/before ed35dab`),
its server runs steps 1 and 2 too, on the same bundle and the same offered rates, in the same run.
With --before PATH --alternate N (or --also FLAGS --alternate N: this server with and without
FLAGS), only the two servers are compared, both started once and their steps taken in turns, N
rounds (c32 for 20 s, then 2x and 4x for 30 s each, the order of the two servers swapped every
round): this machine's speed drifts by tens of percent within minutes,
which a comparison that measures one server for nine minutes and then the other cannot tell from
a change. The offered rates are fixed after the first round's capacities (2x and 4x their mean).
Writes bench/results/overload.json (--out: elsewhere, e.g. a run on another machine kept beside it).

    .venv/bin/python bench/overload.py [--bundle artifacts/default-bundle] [--also "--workers 2 --threads 1" --also "--spin off"] [--before /tmp/before] [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import checkout_commit, environment, in_turns, older_checkout, one_text_each, romebert_serve, running, running_backend  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.loadtest.driver import run_load  # noqa: E402
from romebert.loadtest.metrics_scrape import MetricsWatch  # noqa: E402
from romebert.loadtest.workload import Workload  # noqa: E402
from romebert.service.settings import Settings  # noqa: E402

TIMEOUT_S = 10.0  # what a client waits before it gives up


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def server_side(watch: MetricsWatch) -> dict:
    """What the server's /metrics say of a step: why it refused, how full its engine calls were."""
    delta, note = watch.finish()
    if delta is None:
        return {"note": note}
    return {"rejected_by_reason": delta.rejected_by_reason, "shed_rows_by_reason": delta.shed_rows_by_reason, "mean_batch_size": delta.mean_batch_size and round(delta.mean_batch_size, 2),
            "average_exit_layer": delta.average_exit_layer and round(delta.average_exit_layer, 3)}


class CpuWatch:
    """Cores the server process and this process (the load generator) used over a step: on two
    shared cores, where the capacity lost past it goes."""

    def __init__(self, pid: int | None):
        self.server = psutil.Process(pid) if pid else None
        self.wall_started, self.generator_started, self.server_started = time.perf_counter(), time.process_time(), self._server_cpu()

    def _server_cpu(self) -> float:
        return sum(self.server.cpu_times()[:2]) if self.server else 0.0

    def finish(self, answers: int) -> dict:
        wall = time.perf_counter() - self.wall_started
        generator, server = time.process_time() - self.generator_started, self._server_cpu() - self.server_started
        out = {"generator_cores": round(generator / wall, 2)}
        if self.server:
            out |= {"server_cores": round(server / wall, 2), "server_cpu_ms_per_answer": round(1000 * server / answers, 2) if answers else None}
        return out


def closed_loop(url: str, workload: Workload, users: int, seconds: float, pid: int | None = None) -> dict:
    watch, cpu = MetricsWatch(url + "/metrics"), CpuWatch(pid)
    run = run_load(url, workload, users, None, seconds, None, TIMEOUT_S)
    ok = [r.latency_ms for r in run.records if r.status == 200]
    return {"users": users, "requests_per_s": round(len(ok) / run.elapsed_s, 1), "p50_ms": percentile(ok, 50), "p99_ms": percentile(ok, 99),
            "status_counts": dict(Counter(str(r.status) for r in run.records)), "server": server_side(watch), "cpu": cpu.finish(len(ok))}


def open_loop(url: str, pid: int, workload: Workload, rate: float, seconds: float) -> dict:
    server = psutil.Process(pid)
    rss_before = server.memory_info().rss / 2**20
    watch, cpu = MetricsWatch(url + "/metrics"), CpuWatch(pid)
    run = run_load(url, workload, 4000, rate, seconds, None, TIMEOUT_S)
    ok = [r.latency_ms for r in run.records if r.status == 200]
    # The server's own account (arrival at the route to the answer): the client's latency adds
    # the generator's own lateness on these shared cores.
    ok_server = [r.server_latency_ms for r in run.records if r.status == 200 and r.server_latency_ms is not None]
    starts = sorted(r.start_s for r in run.records)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
    return {
        "offered_rps": round(rate, 1), "goodput_rps": round(len(ok) / seconds, 1),
        "admitted_p50_ms": percentile(ok, 50), "admitted_p99_ms": percentile(ok, 99), "admitted_server_p99_ms": percentile(ok_server, 99),
        "status_counts": dict(sorted(Counter(str(r.status) if r.status else "no_response" for r in run.records).items())),
        "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(server.memory_info().rss / 2**20, 1),
        "generator": {"achieved_rps": round(achieved, 1), "unsent": run.unsent, "abandoned": run.abandoned},
        "server": server_side(watch), "cpu": cpu.finish(len(ok)),
        "generator_lag_p99_ms": percentile([r.lag_ms for r in run.records], 99),
    }


class HealthProbe(threading.Thread):
    """GET /healthz every 20 ms on one kept-alive connection; latencies in ms."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.host, self.port = url.removeprefix("http://").split(":")
        self.stop, self.latencies = threading.Event(), []

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
        while not self.stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            self.latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)


class SlowClients:
    """`n` connections that send headers and a tenth of their body, then stall; reopened when closed.

    They live in a process of their own, blocked in select() until the server answers or closes
    one: polling 500 sockets from a thread of this process would take the GIL from the load
    generator and show up as the server's latency."""

    def __init__(self, url: str, n: int):
        self.address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.n = n
        self._stop, self._opened = multiprocessing.Event(), multiprocessing.Value("i", 0)
        self._process = multiprocessing.Process(target=self._run, daemon=True)

    @property
    def opened(self) -> int:
        return self._opened.value

    def start(self) -> None:
        self._process.start()

    def stop(self) -> None:
        self._stop.set()
        self._process.join()

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.create_connection(self.address)
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"text": "' + b"x" * 90)
        selector.register(sock, selectors.EVENT_READ)
        with self._opened.get_lock():
            self._opened.value += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(self.n):
            self._open(selector)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.2):  # the server answered (408) or closed: reconnect
                selector.unregister(key.fileobj)
                key.fileobj.close()
                self._open(selector)
        for key in list(selector.get_map().values()):
            key.fileobj.close()


def with_slow_clients(url: str, workload: Workload, seconds: float, slow: int) -> tuple[dict, list[float], int]:
    probe, clients = HealthProbe(url), SlowClients(url, slow) if slow else None
    if clients:
        clients.start()
        time.sleep(2)  # all connected and stalled
    probe.start()
    result = closed_loop(url, workload, 16, seconds)
    probe.stop.set()
    probe.join()
    if clients:
        clients.stop()
    return result, probe.latencies, clients.opened if clients else 0


def pin_generator_apart() -> list[int]:
    """This process (and what it starts later) on the last core; returns the others, the servers'."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs at least two cores")
    os.sched_setaffinity(0, cores[-1:])
    return cores[:-1]


def on_cores(command: list[str], cores: list[int] | None) -> list[str]:
    """`command` run on `cores` (None: wherever this process may run)."""
    return ["taskset", "--cpu-list", ",".join(map(str, cores)), *command] if cores else command


def measure(command: list[str], log: Path, workload: Workload, rates: list[float] | None, env: dict | None = None,
            slow: bool = False, cwd: Path | None = None, cores: list[int] | None = None) -> dict:
    with running(on_cores(command, cores), log, env, cwd) as (proc, url):
        closed_loop(url, workload, 32, 5)  # warm: caches, the cost model's estimates
        capacity = closed_loop(url, workload, 32, 30, proc.pid)
        print(f"  capacity {capacity}", flush=True)
        rates = rates or [2 * capacity["requests_per_s"], 4 * capacity["requests_per_s"]]
        rows = []
        for factor, rate in zip((2, 4), rates):
            row = {"offered_x": factor} | open_loop(url, proc.pid, workload, rate, 60)
            print(f"  {row}", flush=True)
            rows.append(row)
            time.sleep(3)
        out = {"capacity": capacity, "rows": rows}
        if slow:
            unloaded, unloaded_health, _ = with_slow_clients(url, workload, 30, 0)
            loaded, loaded_health, opened = with_slow_clients(url, workload, 30, 500)
            out["slow_clients"] = {
                "connections": 500, "opened": opened, "normal_p99_ms": loaded["p99_ms"], "unloaded_p99_ms": unloaded["p99_ms"],
                "normal_requests_per_s": loaded["requests_per_s"], "unloaded_requests_per_s": unloaded["requests_per_s"],
                "healthz_p99_ms": percentile(loaded_health, 99), "healthz_p99_ms_unloaded": percentile(unloaded_health, 99),
            }
            print(f"  slow clients {out['slow_clients']}", flush=True)
    return out


def older_serve(cli: str, bundle: Path) -> list[str]:
    """An older checkout's server command line (`cli` from bench.harness.older_checkout)."""
    return [sys.executable, "-m", cli, "serve", str(bundle.resolve()), "--host", "127.0.0.1", "--log-level", "warning"]


def alternate(bundle: Path, other: tuple[str, list[str], dict | None, Path | None], rounds: int, workload: Workload, logs: Path,
              cores: list[int] | None) -> dict:
    """This server and `other` (name, command, env, cwd) up at once, their steps in turns (see the
    module's doc): per round and medians."""
    name_other, command, env, cwd = other
    steps = {"ours": [], name_other: []}
    with running(on_cores(romebert_serve(bundle), cores), logs / "overload-ours.log") as (ours_proc, ours_url), \
            running(on_cores(command, cores), logs / f"overload-{name_other}.log", env, cwd) as (other_proc, other_url):
        servers = {"ours": (ours_url, ours_proc.pid), name_other: (other_url, other_proc.pid)}
        backends = {name: running_backend(url) for name, (url, _) in servers.items()}
        for url, _ in servers.values():
            closed_loop(url, workload, 32, 5)  # warm: caches, the cost model's estimates
        rates = None
        for k in range(rounds):
            order = in_turns(list(servers), k)
            capacity = {}
            for name in order:
                url, pid = servers[name]
                capacity[name] = closed_loop(url, workload, 32, 20, pid)
                steps[name].append({"round": k + 1, "capacity": capacity[name]})
            rates = rates or [f * float(np.mean([c["requests_per_s"] for c in capacity.values()])) for f in (2, 4)]
            for factor, rate in zip((2, 4), rates):
                for name in order:
                    url, pid = servers[name]
                    steps[name][-1][f"x{factor}"] = open_loop(url, pid, workload, rate, 30)
                    time.sleep(2)
            print(f"  round {k + 1}: " + "; ".join(
                f"{name} c32 {steps[name][-1]['capacity']['requests_per_s']}, 2x {steps[name][-1]['x2']['goodput_rps']}, 4x {steps[name][-1]['x4']['goodput_rps']}"
                for name in steps), flush=True)
    median = lambda name, get: round(float(np.median([get(step) for step in steps[name]])), 1)  # noqa: E731
    figures = {
        "capacity_rps": lambda s: s["capacity"]["requests_per_s"], "capacity_p99_ms": lambda s: s["capacity"]["p99_ms"],
        "goodput_2x_rps": lambda s: s["x2"]["goodput_rps"], "goodput_4x_rps": lambda s: s["x4"]["goodput_rps"],
        "admitted_p99_2x_ms": lambda s: s["x2"]["admitted_p99_ms"], "admitted_p99_4x_ms": lambda s: s["x4"]["admitted_p99_ms"],
        "server_cpu_ms_per_answer_c32": lambda s: s["capacity"]["cpu"]["server_cpu_ms_per_answer"],
        "rows_per_layer_call_2x": lambda s: s["x2"]["server"]["mean_batch_size"],
    }
    medians = {name: {figure: median(name, get) for figure, get in figures.items()} for name in steps}
    ratios = {figure: [round(get(a) / get(b), 3) for a, b in zip(steps["ours"], steps[name_other])] for figure, get in figures.items()}
    return {"offered_rps": [round(r, 1) for r in rates], "rounds": rounds, "backends": backends, "medians": medians,
            f"ours_over_{name_other}_by_round": ratios, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "artifacts" / "default-bundle")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of an older commit whose server to measure too")
    parser.add_argument("--also", action="append", default=[], metavar="FLAGS",
                        help='this server with other flags too (e.g. "--workers 2 --threads 1"), at 2x and 4x its own capacity; repeatable')
    parser.add_argument("--pin", action="store_true", help="the servers on all cores but the last, the load generator on the last")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="with --before: only the two servers, up at once, their steps in turns for N rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = parser.parse_args()
    if args.alternate and bool(args.before) + len(args.also) != 1:
        parser.error("--alternate compares with one other server: --before PATH's, or this one with one --also FLAGS")
    machine = environment()  # before --pin narrows this process to one core
    cores = pin_generator_apart() if args.pin else None
    bundle = load_bundle(args.bundle)
    task = load_task("rotten_tomatoes")
    workload = one_text_each([e.text for e in task.test])
    logs = ROOT / "artifacts" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    if args.alternate:
        with contextlib.ExitStack() as stack:
            if args.before:
                cli, env = stack.enter_context(older_checkout(args.before))
                other = ("before", older_serve(cli, args.bundle), env, args.before)
                about = {"before": {"checkout": str(args.before), "commit": checkout_commit(args.before)}}
            else:
                other = ("also", romebert_serve(args.bundle, *args.also[0].split()), None, None)
                about = {"also": {"flags": args.also[0]}}
            result = alternate(args.bundle, other, args.alternate, workload, logs, cores)
        result |= about | {"bundle": str(args.bundle), "environment": machine,
                           "pinned": {"server_cores": cores, "generator_cores": sorted(os.sched_getaffinity(0))} if cores else None}
        write_json(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k in ("offered_rps", "medians") or k.startswith("ours_over_")}, indent=1))
        return
    print("this server:", flush=True)
    now = measure(romebert_serve(args.bundle), logs / "overload-server.log", workload, None, slow=True, cores=cores)
    # The serving core against the one it replaced, on the same backend (onnxruntime fp32): the
    # default bundle now picks OpenVINO, which would flatter the comparison.
    with running(on_cores(romebert_serve(args.bundle, "--backend", "onnxruntime"), cores), logs / "overload-server-ort.log") as (_, url):
        closed_loop(url, workload, 32, 5)
        same_backend = closed_loop(url, workload, 32, 30)
    print(f"  capacity on onnxruntime {same_backend}", flush=True)
    result = {
        "capacity_rps": now["capacity"]["requests_per_s"], "rows": now["rows"], "slow_clients": now["slow_clients"],
        "capacity_c32_onnxruntime": same_backend,
        "capacity_c32": now["capacity"], "bundle": str(args.bundle), "default_threshold": bundle.default_threshold,
        "max_queue_wait_ms": Settings().max_queue_wait_ms, "client_timeout_s": TIMEOUT_S,
        "pinned": {"server_cores": cores, "generator_cores": sorted(os.sched_getaffinity(0))} if cores else None,
        "environment": machine,
    }
    result["also"] = []
    for flags in args.also:
        print(f"this server with {flags}:", flush=True)
        also = measure(romebert_serve(args.bundle, *flags.split()), logs / "overload-also.log", workload, None, cores=cores)
        result["also"].append({"flags": flags, "capacity_rps": also["capacity"]["requests_per_s"], "rows": also["rows"], "capacity_c32": also["capacity"]})
    if args.before:
        print(f"the server of {args.before}:", flush=True)
        rates = [row["offered_rps"] for row in now["rows"]]
        with older_checkout(args.before) as (cli, env):
            before = measure(older_serve(cli, args.bundle), logs / "overload-before.log", workload, rates, env=env, cwd=args.before, cores=cores)
        result["before"] = before | {"checkout": str(args.before), "commit": checkout_commit(args.before)}
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
