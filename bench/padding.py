"""Padding slack benchmark (in-process, this CPU): how far rows of different lengths may share a batch.

Why `pad_slack` (`romebert serve --pad-slack`) has the default it has. The real scheduler and
engine on the default bundle, at the backend the export chose (or --backend), the rotten_tomatoes
test texts one a request at the bundle's default threshold, 32 closed-loop clients; each slack
runs `--seconds` at a time and the slacks take turns for `--rounds` rounds, so that drift in the
machine's load hits them alike. A higher slack makes fuller batches that carry more padding; a
lower one more and smaller engine calls. Per slack: items/s, the process's CPU per item, rows per
layer call and padded tokens per real token in the layer calls (the scheduler's own metrics,
romebert_batch_size and romebert_layer_tokens). Writes bench/results/padding.json (or --out).

    .venv/bin/python bench/padding.py            # about 6 minutes; needs artifacts/default-bundle
    .venv/bin/python bench/padding.py --backend openvino --precision f32 --slacks 1.25,1.5 --out ...
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, served_backend  # noqa: E402
from bench.serve import split_of, test_split  # noqa: E402
from romebert.core import metric_names as names  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.engine import Engine  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.core.tokenization import TextEncoder, TokenRow  # noqa: E402
from romebert.service.admission import Admission  # noqa: E402
from romebert.service.cohorts import PAD_SLACK, BatchLimit  # noqa: E402
from romebert.service.cost_model import EwmaCostModel, warm_up  # noqa: E402
from romebert.service.metrics import Metrics  # noqa: E402
from romebert.service.policy import POLICIES  # noqa: E402
from romebert.service.scheduler import Scheduler  # noqa: E402
from romebert.service.settings import Settings  # noqa: E402

BUNDLE = ROOT / "artifacts" / "default-bundle"
DEFAULTS = Settings()  # the server's own: policy, batching window, batch limits
SLACKS = (1.0, 1.15, PAD_SLACK, 1.5, 2.0)


async def closed_loop(engine: Engine, limit: BatchLimit, rows: list[TokenRow], threshold: float, users: int,
                      seconds: float, seed: int) -> dict:
    """`users` clients, each sending one row and the next once answered, for `seconds`; the batches
    and their padding as the scheduler's own metrics count them."""
    metrics = Metrics(engine.num_layers)
    admission = Admission(metrics, max_queue=1 << 20, max_queue_wait_s=3600.0, workers=1, seconds_per_row=0.0)
    scheduler = Scheduler(engine, admission, metrics, EwmaCostModel(engine.num_layers), policy=POLICIES[DEFAULTS.policy],
                          limit=limit, max_wait_ms=DEFAULTS.max_wait_ms)
    scheduler.start()
    rng = np.random.default_rng(seed)
    answered = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    stop = started + seconds

    async def client() -> None:
        nonlocal answered
        while time.perf_counter() < stop:
            row = rows[int(rng.integers(len(rows)))]
            await scheduler.submit([row], threshold, None, scheduler.clock()).future
            answered += 1

    await asyncio.gather(*(client() for _ in range(users)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    admission.close()
    value = metrics.registry.get_sample_value
    _, rows_name, calls_name = names.series(names.BATCH_SIZE)
    (tokens_name,) = names.series(names.LAYER_TOKENS)
    tokens = {kind: value(tokens_name, {"kind": kind}) for kind in names.TOKEN_KINDS}
    return {"items_per_s": round(answered / elapsed, 1), "core_ms_per_item": round(1000 * cpu / answered, 3),
            "rows_per_layer_call": round(value(rows_name) / value(calls_name), 2),
            "padded_per_real_token": round(sum(tokens.values()) / tokens["real"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "f32"), default="bf16", help="with --backend openvino")
    parser.add_argument("--slacks", type=lambda s: [float(x) for x in s.split(",")], default=list(SLACKS))
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "padding.json")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    served = (served_backend(bundle) if args.backend == "auto" else
              {"backend": args.backend, "precision": args.precision if args.backend == "openvino" else bundle.precision})
    engine = Engine(bundle, device="cpu", backend=served["backend"], precision=served["precision"])
    dataset, seed = split_of(ROOT / bundle.manifest["source"]["checkpoint"])
    texts, _ = test_split(dataset, seed)
    rows = TextEncoder(bundle.tokenizer_file, bundle.max_length).tokenize(texts, None)
    limits = {slack: BatchLimit(DEFAULTS.max_batch, DEFAULTS.max_batch_tokens, engine.padded_shape, slack) for slack in args.slacks}
    warm_up(engine, EwmaCostModel(engine.num_layers), limits[max(args.slacks)], bundle.max_length)  # OpenVINO compiles each new shape once
    runs: dict[float, list[dict]] = {slack: [] for slack in args.slacks}
    for round_ in range(args.rounds):
        for slack, limit in limits.items():
            run = asyncio.run(closed_loop(engine, limit, rows, bundle.default_threshold, args.users, args.seconds, seed=round_))
            runs[slack].append(run)
            print(f"round {round_ + 1}, slack {slack:g}: {run}", flush=True)

    table = []
    for slack, passes in runs.items():
        median = {key: float(np.median([p[key] for p in passes])) for key in passes[0]}
        table.append({"pad_slack": slack, **median, "items_per_s_passes": [p["items_per_s"] for p in passes]})
    best = max(table, key=lambda row: row["items_per_s"])
    default = next((row for row in table if row["pad_slack"] == PAD_SLACK), None)
    print(f"\n{len(texts)} test texts, {args.users} clients, {served['backend']}/{served['precision']}, medians of {args.rounds} rounds of {args.seconds:g} s")
    print("| pad slack | items/s | core-ms / item | rows / layer call | padded / real tokens |")
    print("|---|---|---|---|---|")
    for row in table:
        mark = " (default)" if row["pad_slack"] == PAD_SLACK else ""
        print(f"| {row['pad_slack']:g}{mark} | {row['items_per_s']:.1f} | {row['core_ms_per_item']:.2f} | "
              f"{row['rows_per_layer_call']:.2f} | {row['padded_per_real_token']:.3f} |")
    write_json(args.out, {
        "bundle": str(args.bundle), "dataset": dataset, "backend": served, "users": args.users,
        "seconds": args.seconds, "rounds": args.rounds, "default_pad_slack": PAD_SLACK, "rows": table,
        "ratios": {"best_over_default_items_per_s": round(best["items_per_s"] / default["items_per_s"], 3) if default else None,
                   "best_pad_slack": best["pad_slack"]},
        "environment": environment(),
    })
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
