"""Serving benchmark (this CPU): our server vs a plain FastAPI + transformers server, over HTTP.

Real bundle (bench/engine.py exports it from the bench/train.py checkpoint), texts from the
rotten_tomatoes test split, `romebert loadtest` (Locust, closed loop) for 60 s per point:
our server at concurrency 1 and 32 at the bundle's default threshold, with one engine worker
(the default) and with two, and at 32 with the regroup scheduler policy; the baseline at 32.
Our servers run with --log-level warning (no access log line per request). Also the in-process
engine's batch-1 p50 and best offline throughput at the same threshold (the best of one worker
with every core and one worker per core, each with length-sorted batches of 32 and with batch 1),
and each server's test accuracy (all 853 test texts sent once). Writes bench/results/serve.json.

    .venv/bin/python bench/serve.py [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workers import in_fresh_process, items_per_s  # noqa: E402
from service.bundle import load_bundle  # noqa: E402
from service.engine import Engine, default_threads, run_early_exit  # noqa: E402
from service.tokenization import TextEncoder  # noqa: E402
from training.data import load_task  # noqa: E402
from training.files import write_json  # noqa: E402

BUNDLE = ROOT / "artifacts" / "bench" / "bundle-fp32"
CHECKPOINT = ROOT / "artifacts" / "bench" / "romebert"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/classify", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def server_accuracy(url: str, texts: list[str], labels: list[str]) -> tuple[float, float]:
    """Accuracy and mean exit layer of the server's answers over the whole test split."""
    answers = []
    for i in range(0, len(texts), 16):
        answers += post(url, {"text": texts[i : i + 16]})["results"]
    acc = float(np.mean([a["label"] == y for a, y in zip(answers, labels)]))
    return acc, float(np.mean([a["exit_layer"] for a in answers]))


def loadtest(url: str, users: int, duration: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "romebert_cli", "loadtest", url, "--users", str(users), "--duration", str(duration),
           "--dataset", "rotten_tomatoes", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def engine_batch1_p50_ms(texts: list[str], threshold: float) -> float:
    """In-process, one worker with every core: batch-1 p50 (ms) over 200 texts, the first 10 not counted."""
    bundle = load_bundle(BUNDLE)
    engine = Engine(bundle, device="cpu")
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    times = []
    for text in texts[:200]:
        t = time.perf_counter()
        run_early_exit(engine, encoder.encode([text]), np.array([threshold]))
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times[10:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    task = load_task("rotten_tomatoes")
    texts = [e.text for e in task.test]
    labels = [task.labels[e.label] for e in task.test]
    threshold = load_bundle(BUNDLE).default_threshold
    engine_p50 = in_fresh_process(engine_batch1_p50_ms, texts, threshold)
    # One worker with every core or one per core; length-sorted batches of 32 (least padding) or
    # batch 1 (no padding at all, which on a small CPU can beat batching).
    offline = {f"{w}_workers_batch_{b}": in_fresh_process(items_per_s, w, max(default_threads() // w, 1), b, "length")
               for w in (1, 2) for b in (32, 1)}
    engine_items_per_s = max(offline.values())
    print(f"in-process engine at threshold {threshold}: batch-1 p50 {engine_p50:.2f} ms, offline items/s "
          + ", ".join(f"{k} {v:.1f}" for k, v in offline.items()), flush=True)

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    serve = [sys.executable, "-m", "romebert_cli", "serve", str(BUNDLE), "--host", "127.0.0.1", "--log-level", "warning"]
    # (name, command, concurrencies): our server with its defaults, with two engine workers, with
    # the regroup policy, and the baseline a user would write.
    servers = [
        ("romebert", serve, (1, 32)),
        ("romebert_workers_2", serve + ["--workers", "2"], (1, 32)),
        ("romebert_policy_regroup", serve + ["--policy", "regroup"], (32,)),
        ("baseline_transformers", [sys.executable, str(ROOT / "bench" / "baseline_server.py"), str(CHECKPOINT)], (32,)),
    ]
    for name, command, concurrencies in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(command + ["--port", str(port)], env=os.environ | {"PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "w"))
        try:
            wait_ready(url, proc)
            acc, avg_exit = server_accuracy(url, texts, labels)
            for users in concurrencies:
                report = loadtest(url, users, args.duration, tmp / f"{name}-{users}")
                lat = report["latency_ms"]
                row = {"server": name, "concurrency": users, "p50_ms": round(lat["p50"], 2), "p99_ms": round(lat["p99"], 2),
                       "requests_per_s": round(report["throughput"]["requests_per_s"], 1), "test_acc": round(acc, 4),
                       "avg_exit_layer": round(avg_exit, 3), "errors": report["requests"]["failed"]}
                rows.append(row)
                print(row, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    ratios = {
        "romebert_over_baseline_rps_c32": by["romebert", 32]["requests_per_s"] / by["baseline_transformers", 32]["requests_per_s"],
        "http_overhead_p50_ms_c1": by["romebert", 1]["p50_ms"] - engine_p50,
        "c32_rps_over_offline_engine": by["romebert", 32]["requests_per_s"] / engine_items_per_s,
        "c32_rps_over_offline_engine_workers_2": by["romebert_workers_2", 32]["requests_per_s"] / engine_items_per_s,
    }
    for k, v in ratios.items():
        print(f"{k:<34} {v:.3f}")
    write_json(ROOT / "bench" / "results" / "serve.json", {
        "engine_p50_ms_batch1": round(engine_p50, 3), "engine_offline_items_per_s": round(engine_items_per_s, 1),
        "engine_offline_items_per_s_by_config": {k: round(v, 1) for k, v in offline.items()},
        "threshold": threshold, "duration_s": args.duration, "rows": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()},
    })


if __name__ == "__main__":
    main()
