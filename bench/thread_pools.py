"""Thread pools for the segmented engine (this CPU): why the server keeps onnxruntime's one
process-wide pool, whose threads spin between calls, instead of pools that sleep.

A lone request on the default server burns about 1.8 cores: the global pool's threads spin
between onnxruntime calls and between requests. onnxruntime offers no switch for the global
pool's spinning from Python; per-session pools have two (`session.intra_op.allow_spinning=0`, and
`session.force_spinning_stop=1`: stop once the last Run returns). Candidates, on 2 threads unless
said: "global" (the engine as shipped), "session_nospin", "session_stop", and "one" (one thread,
no pool at all).

1. In process, the default bundle at its default threshold, rotten_tomatoes test texts in a
   seeded random order: batch 1 with a 2 ms gap between calls (as a lone client's requests
   arrive) and batch 32; alone, and next to a process that keeps 0.4 of a core busy (as the event
   loop and a load generator do). Wall p50 per call, items/s while busy, and the process's CPU
   time per item. Each candidate runs in a fresh process.
2. Over HTTP: `romebert serve` with its defaults, with per-session pools that do not spin, with
   `--workers 2 --threads 1`, and with `--threads 1`; closed loop at concurrency 1 and 32. The
   server's CPU per request, split into its event loop's thread (HTTP, validation, tokenizing,
   rendering) and the rest (the engine's workers and onnxruntime's threads), from psutil on its
   PID: the load generator does not count. The server's own reported time per request (arrival at
   the route to the answer) beside the client's p50 splits a lone request's latency into the
   server's part and the rest (HTTP parsing, the kernel, the load generator on the same cores).

Writes bench/results/thread_pools.json and prints both tables.

    .venv/bin/python bench/thread_pools.py [--seconds 25]    # about 6 minutes; needs artifacts/default-bundle
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, one_text_each, romebert_serve, running  # noqa: E402
from bench.workers import in_fresh_process, rival  # noqa: E402
from romebert.core.files import write_json  # noqa: E402

BUNDLE = ROOT / "artifacts" / "default-bundle"
MODES = ("global", "session_nospin", "session_stop", "one")
SESSION_CONFIG = {"session_stop": ("session.force_spinning_stop", "1")}  # what the engine does not offer itself
RIVAL = 0.4


def use_session_pools(mode: str) -> None:
    """Make every session of this process open with its own pool, configured as `mode` says,
    instead of the process-wide one (the engine looks open_session up at each call)."""
    import onnxruntime as ort

    from romebert.core import engine

    def open_session(path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads, options.inter_op_num_threads = threads or engine.default_threads(), 1
        options.add_session_config_entry(*SESSION_CONFIG[mode])
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    engine.open_session = open_session


def in_process(mode: str, batch: int) -> dict:
    """One candidate at one batch size, in this (fresh) process."""
    from romebert.core.bundle import load_bundle
    from romebert.core.data import load_task
    from romebert.core.engine import Engine, run_early_exit, set_pool_spinning
    from romebert.core.tokenization import TextEncoder

    if mode == "session_nospin":
        set_pool_spinning(False)  # the server's --spin off
    elif mode in SESSION_CONFIG:
        use_session_pools(mode)
    bundle = load_bundle(BUNDLE)
    engine = Engine(bundle, device="cpu", threads=1 if mode == "one" else 2)
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    texts = [e.text for e in load_task("rotten_tomatoes").test]
    order = np.random.default_rng(0).permutation(len(texts))[: 300 if batch == 1 else None]
    batches = [encoder.encode([texts[j] for j in order[i : i + batch]]) for i in range(0, len(order), batch)]
    thresholds = [np.full(len(b.lengths), bundle.default_threshold) for b in batches]
    for b, t in list(zip(batches, thresholds))[:20]:
        run_early_exit(engine, b, t)
    walls = []
    cpu = time.process_time()
    for b, t in zip(batches, thresholds):
        started = time.perf_counter()
        run_early_exit(engine, b, t)
        walls.append(time.perf_counter() - started)
        if batch == 1:
            time.sleep(0.002)
    cpu = time.process_time() - cpu
    return {"p50_ms": round(1000 * float(np.median(walls)), 2), "busy_items_per_s": round(len(order) / sum(walls), 1),
            "cpu_ms_per_item": round(1000 * cpu / len(order), 3)}


def over_http(seconds: float) -> list[dict]:
    from bench.serve import measure, test_split
    from romebert.loadtest.driver import run_load

    texts, _ = test_split("rotten_tomatoes", 42)
    workload = one_text_each(texts)
    serve = romebert_serve(BUNDLE)
    servers = {
        "defaults (global pool, 1 worker x 2 threads)": serve,
        "per-session pools, no spinning (1 x 2)": [*serve, "--spin", "off"],
        "--workers 2 --threads 1": [*serve, "--workers", "2", "--threads", "1"],
        "--threads 1": [*serve, "--threads", "1"],
    }
    rows = []
    for name, command in servers.items():
        with running(command, ROOT / "artifacts" / "bench" / "thread_pools-serve.log") as (proc, url):
            run_load(url, workload, 32, None, 5, None, 30.0)  # warm
            for users in (1, 32):
                row = {"server": name} | measure(url, proc.pid, workload, users, seconds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="per HTTP load point")
    args = parser.parse_args()
    (ROOT / "artifacts" / "bench").mkdir(parents=True, exist_ok=True)
    engine_rows = []
    for duty in (0.0, RIVAL):
        for batch in (1, 32):
            for mode in MODES:
                with rival(duty):
                    row = {"mode": mode, "batch": batch, "rival_cores": duty} | in_fresh_process(in_process, mode, batch)
                engine_rows.append(row)
                print(json.dumps(row), flush=True)
    http_rows = over_http(args.seconds)
    print("\n| pool | batch | rival | p50 ms | items/s busy | CPU ms/item |\n|---|---|---|---|---|---|")
    for r in engine_rows:
        print(f"| {r['mode']} | {r['batch']} | {r['rival_cores']} | {r['p50_ms']} | {r['busy_items_per_s']} | {r['cpu_ms_per_item']} |")
    print("\n| server | c | requests/s | p50 ms | server-reported p50 ms | statuses | server core-ms/request | event loop | other threads |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in http_rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['server_reported_p50_ms']} | {r['statuses']} | "
              f"{r['server_cpu_ms_per_request']} | {r['loop_cpu_ms_per_request']} | {r['other_threads_cpu_ms_per_request']} |")
    write_json(ROOT / "bench" / "results" / "thread_pools.json",
               {"rival_core_share": RIVAL, "engine": engine_rows, "http": http_rows, "http_seconds": args.seconds, "environment": environment()})


if __name__ == "__main__":
    main()
