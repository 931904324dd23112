"""A lone request's latency over HTTP, and how much of it is the load generator's (issue 14's c1 target).

bench/serve.py measures concurrency 1 with the project's load generator (loadtest/driver.py:
asyncio and aiohttp), which runs on the same two cores as the server, so its own work per request
lies on every request's path. Here one server (`romebert serve` on the default bundle, its
defaults) is measured by that generator and by a plain blocking client (the standard library's
http.client on one kept-alive connection: no event loop, no session, no cookie jar), in turns,
the order swapped every round, next to the target's reference: the in-process engine's batch-1
p50, back to back, in a fresh process, measured in every round too (before its clients in one,
after them in the next), since a reference measured once can land on a slow minute of a machine
that drifts by 10-30%: the target's margin is each round's c1 p50 against the same round's
reference, and the median of those. Both clients draw the same kind of requests
(one rotten_tomatoes test text each, the server's default threshold); the server's own time per
request (`latency_ms` in its answer: route arrival to answer) is kept for each. The plain client
also times GET /healthz, the HTTP stack's floor (uvicorn, the middlewares, routing; no model, no
scheduler). Then the plain client sends requests after an idle gap (`--gaps`), as clients of a
lightly loaded server do, next to the engine's batch-1 p50 after the same gap (fresh processes):
an idle engine's threads sleep, so the reference itself moves with the gap. Last, the server's
own floor: the same server with an engine that costs nothing (bench/instant_server.py, every row
leaving at exit `--floor-layers`), timed by the plain client in the same rounds, so what the server
adds to a lone request is measured without the model. Writes bench/results/lone_request.json.

    .venv/bin/python bench/lone_request.py [--rounds 4] [--requests 1500] [--gaps 0.01 0.2] [--floor-layers 2] [--out ...]   # about 6 minutes
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, in_turns, instant_serve, one_text_each, romebert_serve, running, served_backend  # noqa: E402
from bench.serve import BUNDLE, engine_batch1_p50_ms, split_of, test_split  # noqa: E402
from bench.workers import in_fresh_process  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.loadtest.driver import run_load  # noqa: E402
from romebert.loadtest.workload import Workload  # noqa: E402

REFERENCE = "engine_reference"  # the in-process engine's batch-1 p50, in each round's turns
WARM_UP = 200  # requests each client sends before a round counts (first calls at new shapes)


def generator_client(url: str, workload: Workload, n: int) -> tuple[list[float], list[float]]:
    """(client ms, server ms) of n requests, one at a time, from the project's load generator."""
    run = run_load(url, workload, 1, None, 3600.0, n, 30.0)
    ok = [r for r in run.records if r.status == 200]
    if len(ok) != n:
        raise RuntimeError(f"the load generator got {n - len(ok)} answers other than 200")
    return [r.latency_ms for r in ok], [r.server_latency_ms for r in ok]


def plain_client(url: str, workload: Workload | None, n: int, seed: int, gap_s: float = 0.0) -> tuple[list[float], list[float]]:
    """(client ms, server ms) of n requests, one at a time (each after `gap_s` of idle), over one
    kept-alive http.client connection: POST /classify, or with no workload GET /healthz (the HTTP
    stack's own floor, no model and no scheduler; its server ms are left empty)."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port)
    rng = random.Random(seed)
    client, server = [], []
    try:
        for _ in range(n):
            body = None if workload is None else json.dumps(workload.draw(rng).body).encode()
            time.sleep(gap_s)
            started = time.perf_counter()
            if body is None:
                connection.request("GET", "/healthz")
            else:
                connection.request("POST", "/classify", body, {"content-type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            client.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"the plain client got {response.status}: {data[:200]!r}")
            if body is not None:
                server.append(json.loads(data)["latency_ms"])
    finally:
        connection.close()
    return client, server


def server_floor(workload: Workload, rounds: int, requests: int, layers: int) -> dict:
    """The plain client's p50s against the server with an engine that costs nothing (median of
    `rounds`, each one POST /classify run and one GET /healthz run)."""
    runs = []
    with running(instant_serve(BUNDLE, "--layers", str(layers)), ROOT / "artifacts" / "bench" / "instant-server.log") as (_, url):
        plain_client(url, workload, WARM_UP, -1)
        for k in range(rounds):
            client_ms, server_ms = plain_client(url, workload, requests, k)
            healthz_ms, _ = plain_client(url, None, requests, k)
            runs.append({"client_p50_ms": p50(client_ms), "server_p50_ms": p50(server_ms), "healthz_p50_ms": p50(healthz_ms)})
    return {"exit_layer": layers, "rounds": runs} | {key: p50([r[key] for r in runs]) for key in runs[0]}


def p50(values: list[float]) -> float:
    return round(float(np.median(values)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1500, help="per client and round")
    parser.add_argument("--gaps", type=float, nargs="*", default=[0.01, 0.2], help="idle seconds before each request of the gap step")
    parser.add_argument("--gap-requests", type=int, default=100, help="requests (and engine calls) per gap")
    parser.add_argument("--floor-layers", type=int, default=2,
                        help="the exit every row leaves at on the engine that costs nothing (2: the default model's median on test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lone_request.json",
                        help="where the results go (a run on another CPU model keeps the committed one)")
    args = parser.parse_args()
    bundle = load_bundle(BUNDLE)
    texts, _ = test_split(*split_of(ROOT / bundle.manifest["source"]["checkpoint"]))
    workload = one_text_each(texts)
    chosen = served_backend(bundle)

    def engine_reference(*gap_and_calls: float) -> float:
        return in_fresh_process(engine_batch1_p50_ms, BUNDLE, chosen["backend"], chosen["precision"], texts, *gap_and_calls)

    engine_after_gap = {gap: engine_reference(gap, args.gap_requests) for gap in args.gaps}
    rounds, gaps = [], []
    with running(romebert_serve(BUNDLE), ROOT / "artifacts" / "bench" / "lone-request-server.log") as (_, url):
        clients = {
            "load_generator": lambda n, k: generator_client(url, workload, n),
            "plain_http_client": lambda n, k: plain_client(url, workload, n, k),
            "plain_http_client_healthz": lambda n, k: plain_client(url, None, n, k),
        }
        for run in clients.values():
            run(WARM_UP, -1)
        for k in range(args.rounds):
            # the reference in every round's turns too, before its clients or after them, as the machine drifts
            order = in_turns([REFERENCE, *clients], k)
            row = {"round": k + 1, "order": order}
            for name in order:
                if name == REFERENCE:
                    row["engine_p50_ms"] = round(engine_reference(), 3)
                    continue
                client_ms, server_ms = clients[name](args.requests, k)
                row[name] = {"client_p50_ms": p50(client_ms), "server_p50_ms": p50(server_ms) if server_ms else None,
                             "client_p99_ms": round(float(np.percentile(client_ms, 99)), 3)}
            rounds.append(row)
            print(row, flush=True)
        for gap in args.gaps:
            client_ms, server_ms = plain_client(url, workload, args.gap_requests, 100, gap)
            gaps.append({"gap_ms": 1000 * gap, "client_p50_ms": p50(client_ms), "server_p50_ms": p50(server_ms),
                         "engine_p50_ms_after_gap": round(engine_after_gap[gap], 3)})
    floor = server_floor(workload, args.rounds, args.requests, args.floor_layers)
    summary = {name: {key: p50([r[name][key] for r in rounds]) if rounds[0][name][key] is not None else None
                      for key in ("client_p50_ms", "server_p50_ms")} for name in clients}
    engine_p50 = p50([r["engine_p50_ms"] for r in rounds])
    # the target's margin, paired by round (each round's c1 p50 against the same round's reference)
    over_engine = {name: p50([r[name]["client_p50_ms"] - r["engine_p50_ms"] for r in rounds]) for name in clients}
    print(f"\nin-process engine batch-1 p50 (back to back), median of rounds: {engine_p50:.2f} ms "
          f"(by round {[r['engine_p50_ms'] for r in rounds]}); the target: c1 p50 at most 1 ms above it")
    print(f"\n{'client':<28}{'c1 p50 ms (median of rounds)':>30}{'server own p50 ms':>20}{'minus engine ms':>18}")
    for name, s in summary.items():
        server = "-" if s["server_p50_ms"] is None else f"{s['server_p50_ms']:.2f}"
        print(f"{name:<28}{s['client_p50_ms']:>30.2f}{server:>20}{over_engine[name]:>18.2f}")
    if gaps:
        print(f"\n{'idle gap ms':<14}{'engine p50 after it':>20}{'c1 p50 (plain)':>16}{'server own p50':>16}{'minus engine':>14}")
        for g in gaps:
            print(f"{g['gap_ms']:<14g}{g['engine_p50_ms_after_gap']:>20.2f}{g['client_p50_ms']:>16.2f}{g['server_p50_ms']:>16.2f}"
                  f"{g['client_p50_ms'] - g['engine_p50_ms_after_gap']:>14.2f}")
    print(f"\nthe server's own floor (an engine that costs nothing, every row leaving at exit {args.floor_layers}): "
          f"c1 p50 {floor['client_p50_ms']:.2f} ms, its own {floor['server_p50_ms']:.2f} ms, /healthz {floor['healthz_p50_ms']:.2f} ms")
    write_json(args.out, {
        "bundle_backend": chosen, "engine_p50_ms_batch1": round(engine_p50, 3), "requests_per_round": args.requests,
        "rounds": rounds, "median_of_rounds": summary,
        "c1_p50_minus_engine_batch1_p50_ms": {name: over_engine[name] for name, s in summary.items() if s["server_p50_ms"] is not None},
        "after_idle_gaps": gaps,
        "server_floor": floor,
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
