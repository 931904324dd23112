"""Serving benchmark (this CPU): our server vs a plain FastAPI + transformers server, over HTTP.

Real bundle (bench/engine.py exports it from the bench/train.py checkpoint), texts from the
rotten_tomatoes test split, `romebert loadtest` (Locust, closed loop) for 60 s per point:
our server at concurrency 1 and 32 at the bundle's default threshold, with one engine worker
(the default) and with two, and at 32 with the regroup scheduler policy; the baseline at 32.
Our servers run with --log-level warning (no access log line per request). Also the in-process
engine's batch-1 p50 and best offline throughput at the same threshold (the best of one worker
with every core and one worker per core, each with length-sorted batches of 32 and with batch 1),
and each server's test accuracy (all 853 test texts sent once).

The load generator shares the server's cores, so what HTTP and the load generator cost per request
bounds how close the server can come to the offline engine. To measure that cost, our server also
serves a tiny random model (3 layers, 32 wide: its core time per item, measured offline, is
taken out) at concurrency 32; every point records how many cores the machine kept busy (psutil), and
the ceiling follows: 1 / (1 + overhead per request x offline items/s / cores).
Writes bench/results/serve.json.

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
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workers import in_fresh_process, items_per_s  # noqa: E402
from romebert.model_export.export import export_bundle  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.engine import Engine, default_threads, run_early_exit  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from tiny_backbone import make_tiny_backbone, tiny_train_config  # noqa: E402
from romebert.training.train import train  # noqa: E402

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


def busy_core_seconds() -> float:
    """CPU seconds the whole machine has spent not idle, summed over its cores."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def loadtest(url: str, users: int, duration: float, out: Path) -> tuple[dict, float]:
    """The load test's report, and how many cores the machine kept busy during its steady part
    (from 5 s after the start to 5 s before the end: Locust's start-up and report are not counted)."""
    cmd = [sys.executable, "-m", "romebert.cli", "loadtest", url, "--users", str(users), "--duration", str(duration),
           "--dataset", "rotten_tomatoes", "--out", str(out)]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL) as proc:
        time.sleep(5)
        busy, started = busy_core_seconds(), time.perf_counter()
        time.sleep(max(duration - 10, 1))
        busy_cores = (busy_core_seconds() - busy) / (time.perf_counter() - started)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return json.loads((out / "report.json").read_text()), busy_cores


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


def serve(bundle: Path, *flags: str) -> list[str]:
    """Our server's command line, without an access-log line per request."""
    return [sys.executable, "-m", "romebert.cli", "serve", str(bundle), "--host", "127.0.0.1", "--log-level", "warning", *flags]


def tiny_bundle(folder: Path) -> Path:
    """A model that costs next to nothing: the tiny random backbone, trained for a moment, exported."""
    backbone = make_tiny_backbone(folder / "backbone")
    checkpoint = train(tiny_train_config(backbone, folder / "checkpoint", max_length=64))  # the real bundle's max_length
    return export_bundle(checkpoint, folder / "bundle", limit=64, log=lambda *_: None)


def best_offline(bundle: Path) -> dict[str, float]:
    """Offline items/s of one worker with every core and one worker per core, each with
    length-sorted batches of 32 (least padding) and batch 1 (none at all, which on a small CPU
    can beat batching), each in a fresh process."""
    return {f"{w}_workers_batch_{b}": in_fresh_process(items_per_s, w, max(default_threads() // w, 1), b, "length", bundle)
            for w in (1, 2) for b in (32, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    task = load_task("rotten_tomatoes")
    texts = [e.text for e in task.test]
    labels = [task.labels[e.label] for e in task.test]
    threshold = load_bundle(BUNDLE).default_threshold
    engine_p50 = in_fresh_process(engine_batch1_p50_ms, texts, threshold)
    offline = best_offline(BUNDLE)
    engine_items_per_s = max(offline.values())
    print(f"in-process engine at threshold {threshold}: batch-1 p50 {engine_p50:.2f} ms, offline items/s "
          + ", ".join(f"{k} {v:.1f}" for k, v in offline.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tiny = tiny_bundle(tmp / "tiny")
    # One single-thread worker, whose core time is its wall time; the dearer of batch 1 and 32, so
    # that the overhead below is not overstated.
    tiny_core_ms = max(1000 / in_fresh_process(items_per_s, 1, 1, b, "length", tiny) for b in (1, 32))
    print(f"tiny model: {tiny_core_ms:.3f} core ms per item offline", flush=True)

    rows = []
    # (name, command, concurrencies): our server with its defaults, with two engine workers, with
    # the regroup policy, on the tiny model, and the baseline a user would write.
    servers = [
        ("romebert", serve(BUNDLE), (1, 32)),
        ("romebert_workers_2", serve(BUNDLE, "--workers", "2"), (1, 32)),
        ("romebert_policy_regroup", serve(BUNDLE, "--policy", "regroup"), (32,)),
        ("romebert_tiny_model", serve(tiny), (32,)),
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
                report, busy_cores = loadtest(url, users, args.duration, tmp / f"{name}-{users}")
                lat = report["latency_ms"]
                row = {"server": name, "concurrency": users, "p50_ms": round(lat["p50"], 2), "p99_ms": round(lat["p99"], 2),
                       "requests_per_s": round(report["throughput"]["requests_per_s"], 1), "test_acc": round(acc, 4),
                       "avg_exit_layer": round(avg_exit, 3), "errors": report["requests"]["failed"], "busy_cores": round(busy_cores, 2)}
                rows.append(row)
                print(row, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    # Core time per request at concurrency 32 that is not the model's: HTTP, scheduling, the load generator.
    tiny_row = by["romebert_tiny_model", 32]
    overhead_ms = 1000 * tiny_row["busy_cores"] / tiny_row["requests_per_s"] - tiny_core_ms
    ratios = {
        "romebert_over_baseline_rps_c32": by["romebert", 32]["requests_per_s"] / by["baseline_transformers", 32]["requests_per_s"],
        "http_overhead_p50_ms_c1": by["romebert", 1]["p50_ms"] - engine_p50,
        "c32_rps_over_offline_engine": by["romebert", 32]["requests_per_s"] / engine_items_per_s,
        "c32_rps_over_offline_engine_workers_2": by["romebert_workers_2", 32]["requests_per_s"] / engine_items_per_s,
        "overhead_core_ms_per_request_c32": overhead_ms,
        "c32_ceiling_over_offline_engine": 1 / (1 + overhead_ms / 1000 * engine_items_per_s / default_threads()),
    }
    for k, v in ratios.items():
        print(f"{k:<34} {v:.3f}")
    write_json(ROOT / "bench" / "results" / "serve.json", {
        "engine_p50_ms_batch1": round(engine_p50, 3), "engine_offline_items_per_s": round(engine_items_per_s, 1),
        "engine_offline_items_per_s_by_config": {k: round(v, 1) for k, v in offline.items()},
        "tiny_model_core_ms_per_item": round(tiny_core_ms, 3),
        "threshold": threshold, "duration_s": args.duration, "rows": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()},
    })


if __name__ == "__main__":
    main()
