"""Engine workers benchmark (in-process, this CPU): one worker with every core vs one worker per core.

Why `romebert serve --workers` exists. The default bundle (`make serve`'s, fp32), the
rotten_tomatoes test split in a seeded random order (the order a server sees), batch 1 and
batches of 8, the bundle's default threshold. Each configuration runs in a fresh process (the
onnxruntime thread pool is sized once per process), once with the machine to itself and once
next to a process that keeps 0.3 of a core busy, as HTTP handling does in a server.
Writes bench/results/workers.json and prints a table.

    .venv/bin/python bench/workers.py          # about 3 minutes; needs artifacts/default-bundle
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment  # noqa: E402
from romebert.core.files import write_json  # noqa: E402

BUNDLE = ROOT / "artifacts" / "default-bundle"
# (workers, onnxruntime threads), on 2 cores; the last: two workers sharing the one two-thread pool
# (a lone call would get both threads, two calls at once contend for them).
CONFIGS = [(1, 2), (2, 1), (1, 1), (2, 2)]
DUTY = 0.3  # the competing process's share of one core


def busy(duty: float, stop) -> None:
    """Spin for `duty` of every millisecond, sleep the rest, until `stop` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < duty / 1000:
            pass
        time.sleep((1 - duty) / 1000)


def items_per_s(workers: int, threads: int, batch: int, order: str = "random", bundle_path: Path = BUNDLE,
                backend: str = "onnxruntime", precision: str = "bf16") -> float:
    """Offline early exit over the test split: `workers` threads share one engine of `threads` each.

    order "random": seeded random order, the order a server sees; "length": sorted by text length,
    the best case for batching. Call it in a fresh process (in_fresh_process): onnxruntime sizes its
    global thread pool once per process.
    """
    from romebert.core.bundle import load_bundle
    from romebert.core.engine import Engine, run_early_exit
    from romebert.core.tokenization import TextEncoder
    from romebert.core.data import load_task

    bundle = load_bundle(bundle_path)
    engine = Engine(bundle, device="cpu", threads=threads, backend=backend, precision=precision, streams=workers)
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    texts = [e.text for e in load_task("rotten_tomatoes").test]
    if order == "random":
        rows = np.random.default_rng(0).permutation(len(texts))
    else:
        rows = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [encoder.encode([texts[j] for j in rows[i : i + batch]]) for i in range(0, len(rows), batch)]
    threshold = bundle.default_threshold

    def run(part: list) -> None:
        for b in part:
            run_early_exit(engine, b, np.full(len(b.lengths), threshold))

    run(batches if engine.shapes(batch, bundle.max_length) else batches[: max(1, 64 // batch)])  # warm-up (OpenVINO: every shape)
    started = time.perf_counter()
    pool = [threading.Thread(target=run, args=(batches[k::workers],)) for k in range(workers)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return len(texts) / (time.perf_counter() - started)


def in_fresh_process(function, *args):
    """function(*args) in a new process, which sizes its own onnxruntime thread pool."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


@contextmanager
def rival(duty: float) -> Iterator[None]:
    """A process busy for `duty` of a core while the block runs (none for duty 0)."""
    if not duty:
        yield
        return
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=busy, args=(duty, stop))
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join()


def main() -> None:
    rows = []
    for batch in (1, 8):
        for workers, threads in CONFIGS:
            row = {"workers": workers, "threads": threads, "batch": batch}
            for name, duty in (("items_per_s_alone", 0.0), ("items_per_s_with_rival", DUTY)):
                with rival(duty):
                    row[name] = round(in_fresh_process(items_per_s, workers, threads, batch), 1)
            rows.append(row)
            print(f"batch {batch}, {workers} worker(s) x {threads} thread(s): {row['items_per_s_alone']:7.1f} items/s alone, "
                  f"{row['items_per_s_with_rival']:7.1f} next to a {DUTY:.1f}-core rival", flush=True)
    by = {(r["batch"], r["workers"], r["threads"]): r for r in rows}
    ratios = {
        f"two_workers_over_one_b{b}_{cond}": by[b, 2, 1][f"items_per_s_{cond}"] / by[b, 1, 2][f"items_per_s_{cond}"]
        for b in (1, 8) for cond in ("alone", "with_rival")
    }
    for k, v in ratios.items():
        print(f"{k:<40} {v:.3f}")
    write_json(ROOT / "bench" / "results" / "workers.json", {
        "rival_core_share": DUTY, "threshold": "bundle default", "rows": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
