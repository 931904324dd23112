"""Serving benchmark (this CPU): our server against the best a user could run instead, over HTTP.

Ours: the default bundle (`make serve`'s), with its defaults (`--backend auto`: what the export
measured fastest), at concurrency 1 and 32; the same bundle on onnxruntime's CPU provider in fp32
(the server's previous default) at 32. The strong peers: the fine-tuned model as ONE ONNX graph
(full depth) behind a small FastAPI server with a plain dynamic batcher (bench/peer_server.py), on
every CPU backend and precision: onnxruntime fp32 and int8, OpenVINO bf16 and f32, at 32. And the
FastAPI + transformers pipeline server (bench/baseline_server.py) at 32. And our server with an
engine that costs nothing (bench/instant_server.py), at 1 and 32: its CPU per request is the
server's own code's cost, measured rather than left to a subtraction.

Every server runs in a fresh process; the load generator (loadtest/driver.py, closed loop, 60 s
per point, the test texts of the bundle's data, one per request) shares the two cores. Each row carries
the server process's own CPU time per request (psutil on its PID: the load generator does not
count), its RSS, its test accuracy (every text of the test split of the seed its model was
trained with: 42 for the default model, 1 for bench/train.py's fine-tuned one, which saw part of
seed 42's test split in training), and its backend and precision. The
model's own cost per item, offline, is measured in a fresh process for our default configuration,
so that the server's cost beyond the model follows; the c1 target's reference, the engine's
batch-1 p50, in fresh processes right before and right after our c1 point. Writes
bench/results/serve.json.

    .venv/bin/python bench/serve.py [--duration 60] [--out bench/results/serve.json]   # needs artifacts/default-bundle and bench/train.py's checkpoints
    .venv/bin/python bench/serve.py --alternate 4 --duration 20 --out bench/results/serve_backends_alternated.json   # ours only, two backends in turns
    .venv/bin/python bench/serve.py --alternate 3 --against "--pad-slack 1.5" --duration 30 --out ...   # ours against ours with other flags
    .venv/bin/python bench/serve.py --alternate 3 --against-peer int8 --duration 30 --out ...   # ours against the int8 peer in turns
    .venv/bin/python bench/serve.py --bundle B --finetuned C --out ...   # another pair of one dataset (IMDB: docs/results.md)

The peer bundles (artifacts/bench/peer/<dataset>/{fp32,int8}): the fine-tuned model (by default
bench/train.py's, rotten_tomatoes, seed 1) exported with --monolithic, by this script whenever they
are missing or hold other weights than that checkpoint's (retrained since).
OpenVINO rows run where OpenVINO offers a CPU device: through onnxruntime's plugin on Intel CPUs,
through OpenVINO's own runtime elsewhere (core/engine.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, exported, in_turns, instant_serve, one_text_each, romebert_serve, running, running_backend, served_backend  # noqa: E402
from bench.workers import in_fresh_process, items_per_s  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.engine import openvino_available  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.loadtest.driver import run_load  # noqa: E402
from romebert.loadtest.workload import Workload  # noqa: E402

BUNDLE = ROOT / "artifacts" / "default-bundle"
PEER = ROOT / "artifacts" / "bench" / "peer"  # the fine-tuned model: PEER/fp32, PEER/int8 (with --monolithic)
INSTANT = "romebert_instant_engine"  # our server, its engine replaced by one that costs nothing
FINETUNED = ROOT / "artifacts" / "bench" / "train" / "rotten_tomatoes" / "finetune" / "seed1" / "checkpoint"  # bench/train.py's
ONNXRUNTIME = "--backend onnxruntime"  # --alternate's default other server: the same bundle on onnxruntime fp32


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/classify", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def split_of(checkpoint: Path) -> tuple[str, int]:
    """(dataset, seed) that split the data for this checkpoint: its test split is the one it never saw."""
    config = json.loads((Path(checkpoint) / "training_record.json").read_text())["config"]
    return config["data"], config["seed"]


def test_split(dataset: str, seed: int) -> tuple[list[str], list[str]]:
    task = load_task(dataset, seed=seed)
    return [e.text for e in task.test], [task.labels[e.label] for e in task.test]


def accuracy(url: str, texts: list[str], labels: list[str]) -> float:
    answers = [post(url, {"text": t})["results"][0]["label"] for t in texts]
    return float(np.mean([a == y for a, y in zip(answers, labels)]))


def loop_cpu_s(server: psutil.Process) -> float:
    """CPU seconds of the server's main thread: the event loop (HTTP, validation, tokenizing short
    texts, rendering); the engine's workers and onnxruntime's pool are the other threads."""
    return next(t.user_time + t.system_time for t in server.threads() if t.id == server.pid)


def measure(url: str, pid: int, workload: Workload, users: int, seconds: float) -> dict:
    server = psutil.Process(pid)
    cpu, loop = server.cpu_times(), loop_cpu_s(server)
    run = run_load(url, workload, users, None, seconds, None, 30.0)
    after, loop = server.cpu_times(), loop_cpu_s(server) - loop
    ok = [r.latency_ms for r in run.records if r.status == 200]
    # our server reports its own time per request (arrival at the route to the answer); a peer does not
    reported = [r.server_latency_ms for r in run.records if r.status == 200 and r.server_latency_ms is not None]
    cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
    torch_loaded = any("libtorch" in m.path for m in server.memory_maps())
    return {"concurrency": users, "requests_per_s": round(len(ok) / run.elapsed_s, 1), "p50_ms": round(float(np.percentile(ok, 50)), 2),
            "p99_ms": round(float(np.percentile(ok, 99)), 2), "errors": len(run.records) - len(ok),
            "statuses": {str(code): n for code, n in sorted(Counter(r.status for r in run.records).items())},
            "server_reported_p50_ms": round(float(np.percentile(reported, 50)), 2) if reported else None,
            "server_cpu_ms_per_request": round(1000 * cpu_s / len(ok), 3), "server_cores_busy": round(cpu_s / run.elapsed_s, 2),
            "loop_cpu_ms_per_request": round(1000 * loop / len(ok), 3), "other_threads_cpu_ms_per_request": round(1000 * (cpu_s - loop) / len(ok), 3),
            "rss_mb": round(server.memory_info().rss / 2**20, 1), "torch_loaded": torch_loaded}


def engine_batch1_p50_ms(bundle_path: Path, backend: str, precision: str, texts: list[str], gap_s: float = 0.0, calls: int = 250) -> float:
    """In-process, one worker with every core, the server's default threshold: batch-1 p50 (ms)
    of `calls` calls, each after `gap_s` of idle (0: back to back)."""
    from romebert.core.engine import Engine, run_early_exit
    from romebert.core.tokenization import TextEncoder

    bundle = load_bundle(bundle_path)
    engine = Engine(bundle, device="cpu", backend=backend, precision=precision)
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    times = []
    for k, text in enumerate(texts[:50 + calls]):
        batch = encoder.encode([text])
        if k >= 50:  # the first 50 pay OpenVINO's compiles, back to back, and do not count
            time.sleep(gap_s)
        started = time.perf_counter()
        run_early_exit(engine, batch, np.array([bundle.default_threshold]))
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times[50:]))


def peer_graph(finetuned: Path, precision: str) -> Path:
    """The strong peer's bundle: the fine-tuned model as one graph in `precision` (fp32 or int8),
    exported unless it holds these weights already."""
    return exported(finetuned, PEER / split_of(finetuned)[0] / precision, precision=precision, monolithic=True)


def peer_serve(graph: Path, *flags: str) -> list[str]:
    """The command of the peer's server (bench/peer_server.py) on `graph`, with its `flags`."""
    return [sys.executable, str(ROOT / "bench" / "peer_server.py"), str(graph), *flags]


def alternate(bundle, rounds: int, seconds: float, out: Path, against: str, other: tuple[str, list[str]] | None = None) -> None:
    """Our default server against another, in turns: the same bundle served with the flags
    `against` (by default on onnxruntime fp32), or `other` (a name and a command: the peer). One
    run's single pass cannot tell apart servers that differ by less than its noise (10-17% here),
    nor a ratio between two servers measured minutes apart on a machine that drifts."""
    chosen = served_backend(bundle)
    if other is None and against == ONNXRUNTIME and (chosen["backend"], chosen["precision"]) == ("onnxruntime", "fp32"):
        raise SystemExit("--alternate: this bundle already serves on onnxruntime fp32 by default; there is nothing to compare it with")
    texts, _ = test_split(*split_of(ROOT / bundle.manifest["source"]["checkpoint"]))
    workload = one_text_each(texts)
    logs = ROOT / "artifacts" / "bench"
    if other is None:
        other = ("onnxruntime/fp32" if against == ONNXRUNTIME else against, romebert_serve(bundle.root, *shlex.split(against)))
    names = {f"{chosen['backend']}/{chosen['precision']}": romebert_serve(bundle.root), other[0]: other[1]}
    rows = []
    with ExitStack() as stack:
        servers = {name: stack.enter_context(running(command, logs / f"serve-alternate-{k}.log")) for k, (name, command) in enumerate(names.items())}
        backends = {name: running_backend(url) for name, (_, url) in servers.items()}
        for _, url in servers.values():
            run_load(url, workload, 32, None, 5, None, 30.0)  # warm
        for r in range(rounds):
            for name in in_turns(list(servers), r):
                proc, url = servers[name]
                for users in (32, 1):
                    row = {"round": r, "runs_on": name} | measure(url, proc.pid, workload, users, seconds if users == 32 else seconds / 2)
                    rows.append(row)
                    print({k: row[k] for k in ("round", "runs_on", "concurrency", "requests_per_s", "p50_ms", "server_cpu_ms_per_request")}, flush=True)
    ours, before = list(names)
    summary = {}
    for users in (32, 1):
        pick = lambda name, key: [row[key] for row in rows if row["runs_on"] == name and row["concurrency"] == users]  # noqa: E731
        summary[f"c{users}"] = {
            "requests_per_s_ratio_by_round": [round(a / b, 3) for a, b in zip(pick(ours, "requests_per_s"), pick(before, "requests_per_s"))],
            "p50_ms": {name: pick(name, "p50_ms") for name in names},
            "server_cpu_ms_per_request": {name: pick(name, "server_cpu_ms_per_request") for name in names},
        }
        print(f"c{users}: {ours} over {before}, requests/s by round: {summary[f'c{users}']['requests_per_s_ratio_by_round']}")
    write_json(out, {"bundle_backend": chosen, "backends": backends, "against": other[0], "rounds": rounds, "seconds_c32": seconds, "seconds_c1": seconds / 2, "rows": rows,
                     "summary": summary, "environment": environment()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="ours (default: make serve's); its texts are its own data's test split")
    parser.add_argument("--finetuned", type=Path, default=FINETUNED,
                        help="the fine-tuned checkpoint the peers serve, trained on the same data (default: bench/train.py's rotten_tomatoes seed 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json",
                        help="where the results go (a run on another CPU model keeps the committed one: e.g. serve_amd.json)")
    parser.add_argument("--alternate", type=int, metavar="ROUNDS", default=0,
                        help="instead: only our server with its defaults against the same bundle served with --against, both up at "
                        "once, taking turns for ROUNDS rounds at c32 and c1 (the order swapped each round)")
    parser.add_argument("--against", default=ONNXRUNTIME, metavar="FLAGS",
                        help="with --alternate: the `romebert serve` flags of the other server (default: %(default)s)")
    parser.add_argument("--against-peer", choices=("fp32", "int8"),
                        help="with --alternate: the other server is the peer (--finetuned as one onnxruntime graph) in this precision")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    if args.alternate:
        peer = None if args.against_peer is None else (f"peer_onnxruntime_{args.against_peer}", peer_serve(peer_graph(args.finetuned, args.against_peer)))
        alternate(bundle, args.alternate, args.duration, args.out, args.against, peer)
        return
    # Each model is scored on the test split of its own seed: bench/train.py's fine-tuned model
    # (seed 1) was trained on part of the default model's test split (seed 42), and vice versa.
    dataset, ours_seed = split_of(ROOT / bundle.manifest["source"]["checkpoint"])
    peer_dataset, peer_seed = split_of(args.finetuned)
    if dataset != peer_dataset:
        raise SystemExit(f"--bundle was trained on {dataset}, --finetuned on {peer_dataset}: compare models of one dataset")
    seeds = {"ours": ours_seed, "fine-tuned": peer_seed}
    splits = {seed: test_split(dataset, seed) for seed in set(seeds.values())}
    texts, _ = splits[ours_seed]
    workload = one_text_each(texts)
    chosen = served_backend(bundle)
    backend, precision = chosen["backend"], chosen["precision"]
    # The model's own core time per item, offline: one one-thread worker (its wall time is its
    # core time), the cheaper of batch 1 and 32, so that the server's cost beyond it is not understated.
    model_core_ms = min(1000 / in_fresh_process(items_per_s, 1, 1, b, "random", args.bundle, backend, precision) for b in (1, 32))
    print(f"default bundle on {backend}/{precision}: model {model_core_ms:.3f} core-ms/item", flush=True)
    # The c1 target's reference, the engine's batch-1 p50 in a fresh process, is taken right before
    # and right after our c1 point and averaged: once, minutes away, it can land on a slow or fast
    # minute of a machine that drifts by 10-30% (bench/lone_request.py pairs it by round).
    engine_p50s: list[float] = []

    def engine_reference() -> float:
        return in_fresh_process(engine_batch1_p50_ms, args.bundle, backend, precision, texts)

    fp32, int8 = peer_graph(args.finetuned, "fp32"), peer_graph(args.finetuned, "int8")
    servers = [
        ("romebert", romebert_serve(args.bundle), (1, 32), f"{backend}/{precision}"),
        ("romebert_onnxruntime_fp32", romebert_serve(args.bundle, "--backend", "onnxruntime"), (32,), "onnxruntime/fp32"),
        ("peer_onnxruntime_fp32", peer_serve(fp32), (32,), "onnxruntime/fp32"),
        ("peer_onnxruntime_int8", peer_serve(int8), (32,), "onnxruntime/int8"),
        ("peer_openvino_bf16", peer_serve(fp32, "--backend", "openvino", "--precision", "bf16"), (32,), "openvino/bf16"),
        ("peer_openvino_f32", peer_serve(fp32, "--backend", "openvino", "--precision", "f32"), (32,), "openvino/f32"),
        ("baseline_transformers", [sys.executable, str(ROOT / "bench" / "baseline_server.py"), str(args.finetuned)], (32,), "pytorch/fp32"),
        (INSTANT, instant_serve(args.bundle), (1, 32), "instant/none"),
    ]
    if not openvino_available():
        print("OpenVINO offers no CPU device here: its rows are left out", flush=True)
        servers = [s for s in servers if "openvino" not in s[3]]
    rows = []
    logs = ROOT / "artifacts" / "bench"
    for name, command, concurrencies, runs_on in servers:
        with running(command, logs / f"serve-{name}.log") as (proc, url):
            run_load(url, workload, 32, None, 5, None, 30.0)  # warm
            seed = seeds["ours" if name.startswith("romebert") else "fine-tuned"]
            acc = None if name == INSTANT else round(accuracy(url, *splits[seed]), 4)  # the instant engine answers without a model
            for users in concurrencies:
                b, p = runs_on.split("/")
                reference = (name, users) == ("romebert", 1)
                if reference:
                    engine_p50s.append(engine_reference())
                row = {"server": "romebert" if name.startswith("romebert") else "onnx_monolithic_batched" if name.startswith("peer") else "transformers_pipeline",
                       "name": name, "backend": b, "precision": p, "test_acc": acc, "test_split_seed": seed} | measure(url, proc.pid, workload, users, args.duration)
                if reference:
                    engine_p50s.append(engine_reference())
                    print(f"engine batch-1 p50 before and after our c1 point: {engine_p50s[0]:.2f}, {engine_p50s[1]:.2f} ms", flush=True)
                rows.append(row)
                print(row, flush=True)
    engine_p50 = float(np.mean(engine_p50s))
    by = {(r["name"], r["concurrency"]): r for r in rows}
    ours = by["romebert", 32]
    peers = [r for r in rows if r["server"] == "onnx_monolithic_batched"]
    fastest_peer = max(peers, key=lambda r: r["requests_per_s"])
    ratios = {
        "ours_over_fastest_peer_rps_c32": ours["requests_per_s"] / fastest_peer["requests_per_s"],
        "ours_minus_fastest_peer_test_acc": ours["test_acc"] - fastest_peer["test_acc"],
        "ours_over_previous_default_rps_c32": ours["requests_per_s"] / by["romebert_onnxruntime_fp32", 32]["requests_per_s"],
        "server_cpu_ms_beyond_model_c32": ours["server_cpu_ms_per_request"] - model_core_ms,
        "server_cpu_ms_own_code_c32": by[INSTANT, 32]["server_cpu_ms_per_request"],
        "server_cpu_ms_own_code_c1": by[INSTANT, 1]["server_cpu_ms_per_request"],
        "c1_p50_minus_engine_batch1_p50_ms": by["romebert", 1]["p50_ms"] - engine_p50,
    }
    for k, v in ratios.items():
        print(f"{k:<40} {v:.3f}")
    write_json(args.out, {
        "dataset": dataset, "bundle": str(args.bundle), "finetuned": str(args.finetuned), "bundle_backend": chosen, "default_threshold": bundle.default_threshold, "engine_p50_ms_batch1": round(engine_p50, 3),
        "engine_p50_ms_batch1_around_c1": [round(v, 3) for v in engine_p50s],
        "model_core_ms_per_item": round(model_core_ms, 3), "fastest_peer": fastest_peer["name"], "duration_s": args.duration,
        "rows": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()}, "environment": environment(),
    })


if __name__ == "__main__":
    main()
