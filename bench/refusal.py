"""What a refusal costs the server: its own CPU time per 503 at the admission door.

Past capacity most requests are refused, so what a refusal costs is capacity lost. The server
(the default bundle, default settings, `romebert serve`'s uvicorn setup) runs with its engine held
(tests/gated_engine.py: every layer call waits), and enough requests are sent to hold its
predicted wait past the bound; then --requests more come one after another on one kept-alive
connection, each refused at the door. The server's CPU time (its PID: user + system) over them,
divided by their number, is the cost; the client's own time is reported apart.

With --before PATH (a checkout of an older commit, e.g. `git worktree add /tmp/head HEAD`), that
checkout's server is measured too, alternating rounds with this one's, in the same run. Writes
bench/results/refusal.json (--out: elsewhere, e.g. another machine's run kept beside it).

    .venv/bin/python bench/refusal.py [--bundle artifacts/default-bundle] [--before /tmp/head]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, free_port, older_checkout  # noqa: E402
from romebert.core.files import write_json  # noqa: E402

BODY = json.dumps({"text": "a gripping, funny and sad film"}).encode()
HEADERS = {"content-type": "application/json"}


def serve_held(bundle: str, port: int) -> None:
    """The server, its engine held once warm (run in a child process)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gated_engine import Gated

    from romebert.service.cli import build_server
    from romebert.service.runtime import default_engine
    from romebert.service.settings import Settings

    engines = []

    def factory(b, s):
        engines.append(Gated(default_engine(b, s)))
        return engines[0]

    server = build_server(Settings(bundle=bundle, host="127.0.0.1", port=port, log_level="warning"), engine_factory=factory)

    def hold_when_ready() -> None:
        while server.runtime.phase.value != "ready" or not server.started:
            time.sleep(0.05)
        engines[0].gate.clear()
        print("HELD", flush=True)

    threading.Thread(target=hold_when_ready, daemon=True).start()
    server.run()


def held_request(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/classify", BODY, HEADERS)
        connection.getresponse().read()
    except OSError:
        pass  # the server is stopped under it


def measure(bundle: str, checkout: Path | None, requests: int, held: int) -> dict:
    port = free_port()
    with contextlib.ExitStack() as stack:
        env = os.environ | (stack.enter_context(older_checkout(checkout))[1] if checkout else {})
        proc = subprocess.Popen([sys.executable, __file__, "--serve-held", str(port), "--bundle", bundle], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "HELD", "the server did not start"
            for _ in range(held):  # each waits in the queue: the predicted wait passes the bound
                threading.Thread(target=held_request, args=(port,), daemon=True).start()
            time.sleep(2)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

            def one() -> int:
                connection.request("POST", "/classify", BODY, HEADERS)
                response = connection.getresponse()
                response.read()
                return response.status

            statuses = [one() for _ in range(200)]  # warm
            server = psutil.Process(proc.pid)
            before, client_before, wall = server.cpu_times(), time.process_time(), time.perf_counter()
            statuses = [one() for _ in range(requests)]
            after = server.cpu_times()
            wall, client = time.perf_counter() - wall, time.process_time() - client_before
        finally:
            proc.kill()  # not a graceful stop: that would wait for the held rows
            proc.wait(timeout=30)
    assert set(statuses) == {503}, f"not every request was refused: {sorted(set(statuses))}"
    server_s = (after.user + after.system) - (before.user + before.system)
    return {"server_cpu_us_per_refusal": 1e6 * server_s / requests, "client_cpu_us_per_refusal": 1e6 * client / requests,
            "wall_us_per_refusal": 1e6 * wall / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(ROOT / "artifacts" / "default-bundle"))
    parser.add_argument("--before", type=Path, help="an older checkout whose server is measured too")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--held", type=int, default=200, help="requests held in the queue (enough for a predicted wait past 250 ms)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refusal.json")
    parser.add_argument("--serve-held", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_held:
        serve_held(args.bundle, args.serve_held)
        return
    servers = {"this": None} | ({"before": args.before.resolve()} if args.before else {})
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, checkout in servers.items():
            rounds[name].append(measure(args.bundle, checkout, args.requests, args.held))
    summary = {name: {key: round(float(np.median([r[key] for r in rs])), 1) for key in rs[0]} | {"rounds": rs}
               for name, rs in rounds.items()}
    print(f"{'server':8} {'server CPU µs/refusal':>22} {'client CPU µs':>14} {'wall µs':>8}   (median of {args.rounds} rounds)")
    for name, s in summary.items():
        print(f"{name:8} {s['server_cpu_us_per_refusal']:22.1f} {s['client_cpu_us_per_refusal']:14.1f} {s['wall_us_per_refusal']:8.1f}")
    result = {"servers": summary, "requests_per_round": args.requests, "held": args.held, "bundle": args.bundle,
              "before": str(args.before) if args.before else None, "environment": environment()}
    if args.before:
        result["this_over_before_server_cpu"] = round(summary["this"]["server_cpu_us_per_refusal"] / summary["before"]["server_cpu_us_per_refusal"], 3)
        print(f"this / before, server CPU per refusal: {result['this_over_before_server_cpu']:.3f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
