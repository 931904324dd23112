"""Scheduler policy benchmark (in-process, this CPU): "complete" vs "regroup" under a mixed stream.

The same seeded open-loop arrival stream (Poisson) is replayed against the real scheduler and
engine under each policy:
  complete         the server's default: a batch runs to its end (shedding confident rows)
                   before the next is formed;
  regroup          admit arrivals at every layer boundary, merge cohorts at the same depth,
                   fresh cohorts first, then the deepest;
  regroup-deepest  the same, but always the deepest cohort first (no fresh-first rule).
The stream mixes four kinds of request: "easy" (1 text, the bundle's default threshold),
"budget" (the same with a latency budget: 15 ms, or --budget-ms), "full" (1 text, threshold 0: full depth, e.g. an
auditing client) and "batch" (8 texts, default threshold). First the closed-loop capacity of each
policy (every request of a ~800-item stream submitted at once, best of two), then the stream at
two loads, as fractions of the capacity of the first policy run ("complete" unless --policies).
Latency is per answered request, from its arrival to its last answer. Admission is the server's
(no wait bound): a budgeted request whose predicted wait exceeds its budget is refused (503 over
HTTP), and each kind's refusals are counted beside its latencies. Writes bench/results/scheduler_policy.json.

    .venv/bin/python bench/scheduler_policy.py     # ~1.5 min; needs artifacts/bench/bundle-fp32
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.service.cohorts import BatchLimit  # noqa: E402
from romebert.service.cost_model import EwmaCostModel, warm_up  # noqa: E402
from romebert.core.engine import Engine, default_threads  # noqa: E402
from romebert.service.metrics import Metrics  # noqa: E402
from romebert.service.admission import Admission  # noqa: E402
from romebert.service.policy import POLICIES, Policy  # noqa: E402
from romebert.service.scheduler import Scheduler  # noqa: E402
from romebert.core.tokenization import TokenRow, TextEncoder  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.service.tickets import Rejected  # noqa: E402
from bench.harness import environment  # noqa: E402

KINDS = {"easy": (0.5, 1), "budget": (0.2, 1), "full": (0.2, 1), "batch": (0.1, 8)}  # kind -> (share of requests, texts)
MAX_BATCH, MAX_WAIT_MS = 32, 2.0


class DeepestFirst(Policy):
    """regroup without the fresh-first rule: always the deepest cohort next (ties: oldest)."""

    def next(self, cohorts):
        return min(cohorts, key=lambda c: (-c.depth, c.order))


SCHEDULERS = {"complete": POLICIES["complete"], "regroup": POLICIES["regroup"], "regroup-deepest": DeepestFirst("regroup-deepest", regroup=True)}


@dataclass
class Request:
    at: float  # seconds after the start
    kind: str
    rows: list[TokenRow]
    threshold: float
    budget_s: float | None


def make_stream(encoded: list[TokenRow], default_threshold: float, items_per_s: float, seconds: float, seed: int,
                budget_ms: float = 15.0) -> list[Request]:
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)
    shares = np.array([KINDS[k][0] for k in kinds])
    mean_items = float(shares @ np.array([KINDS[k][1] for k in kinds]))
    stream, t = [], 0.0
    while True:
        t += rng.exponential(mean_items / items_per_s)
        if t >= seconds:
            return stream
        kind = kinds[rng.choice(len(kinds), p=shares)]
        rows = [encoded[i] for i in rng.choice(len(encoded), size=KINDS[kind][1], replace=False)]
        budget_s = budget_ms / 1000 if kind == "budget" else None
        stream.append(Request(t, kind, rows, 0.0 if kind == "full" else default_threshold, budget_s))


def batch_limit(engine: Engine) -> BatchLimit:
    """MAX_BATCH rows, no token cap: the batches this benchmark's results were measured with."""
    return BatchLimit(MAX_BATCH, math.inf, engine.padded_shape)


def new_scheduler(name: str, engine: Engine, cost_model: EwmaCostModel) -> Scheduler:
    """In process, no admission bound: the policies are compared on the same work, none turned away."""
    metrics = Metrics(engine.num_layers)
    admission = Admission(metrics, max_queue=1 << 20, max_queue_wait_s=3600.0, workers=1, seconds_per_row=0.0)
    scheduler = Scheduler(engine, admission, metrics, cost_model, policy=SCHEDULERS[name],
                          limit=batch_limit(engine), max_wait_ms=MAX_WAIT_MS)
    scheduler.start()
    return scheduler


async def replay(scheduler: Scheduler, stream: list[Request]) -> list[float | None]:
    """Submit each request at its time; the latency of each in seconds, None where admission refused it."""

    async def one(request: Request) -> float | None:
        arrival = scheduler.clock()
        try:
            await scheduler.submit(request.rows, request.threshold, request.budget_s, arrival).future
        except Rejected:
            return None
        return scheduler.clock() - arrival

    start, tasks = time.perf_counter(), []
    for request in stream:
        await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(request)))
    return list(await asyncio.gather(*tasks))


def answered_ms(latencies: list[float | None]) -> np.ndarray:
    return 1000 * np.array([lat for lat in latencies if lat is not None])


def percentile(ms: np.ndarray, q: float) -> float | None:
    """None when nothing was answered (every request of a kind refused)."""
    return round(float(np.percentile(ms, q)), 2) if len(ms) else None


def summary(latencies: list[float | None], scheduler: Scheduler, elapsed: float, items: int) -> dict:
    ms = answered_ms(latencies)
    sample = scheduler.metrics.registry.get_sample_value
    return {
        "requests": len(latencies),
        "refused": len(latencies) - len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": round(float(ms.mean()), 2),
        "items_per_s": round(items / elapsed, 1),
        "avg_exit_layer": round(sample("romebert_exit_layer_sum") / sample("romebert_exit_layer_count"), 3),
        "layer_calls": int(sample("romebert_batch_size_count")),
        "rows_per_layer_call": round(sample("romebert_batch_size_sum") / sample("romebert_batch_size_count"), 2),
        "budget_exhausted": int(sample("romebert_budget_exhausted_total")),
    }


async def run_policy(name: str, engine: Engine, cost_model: EwmaCostModel, stream: list[Request]) -> dict:
    scheduler = new_scheduler(name, engine, cost_model)
    started = time.perf_counter()
    latencies = await replay(scheduler, stream)
    elapsed = time.perf_counter() - started
    scheduler.admission.close()
    scheduler.join()
    out = summary(latencies, scheduler, elapsed, sum(len(r.rows) for r in stream))
    for kind in KINDS:
        of_kind = [(lat, r) for lat, r in zip(latencies, stream) if r.kind == kind]
        ms = answered_ms([lat for lat, _ in of_kind])
        out[kind] = {"requests": len(of_kind), "refused": len(of_kind) - len(ms),
                     "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
        if kind == "budget":
            over = [lat > r.budget_s for lat, r in of_kind if lat is not None]
            out[kind]["answered_over_budget"] = round(float(np.mean(over)), 3) if over else 0.0
    return out


async def capacity(name: str, engine: Engine, cost_model: EwmaCostModel, encoded: list[TokenRow], default_threshold: float) -> float:
    """Closed-loop items/s of the stream's mix (budgets left out: queued for long, every budgeted row
    would be cut at exit 1) under one policy: everything submitted at once, best of two."""
    stream = make_stream(encoded, default_threshold, items_per_s=1000.0, seconds=0.8, seed=1)  # ~800 items; times unused
    items, best = sum(len(r.rows) for r in stream), 0.0
    for _ in range(2):
        scheduler = new_scheduler(name, engine, cost_model)
        started = time.perf_counter()
        await asyncio.gather(*(scheduler.submit(r.rows, r.threshold, None, scheduler.clock()).future for r in stream))
        best = max(best, items / (time.perf_counter() - started))
        scheduler.admission.close()
        scheduler.join()
    return best


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=ROOT / "artifacts" / "bench" / "bundle-fp32")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each stream")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8], help="arrival rates as fractions of capacity")
    parser.add_argument("--policies", nargs="+", choices=list(SCHEDULERS), default=list(SCHEDULERS), help="which to run (loads are fractions of the first's capacity)")
    parser.add_argument("--capacity", type=float, help="items/s to take the loads' fractions of, instead of measuring it (to replay the same streams against another checkout)")
    parser.add_argument("--budget-ms", type=float, default=15.0, help="the \"budget\" requests' latency budget")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scheduler_policy.json")
    args = parser.parse_args()

    started, load_at_start = time.perf_counter(), round(os.getloadavg()[0], 2)  # other work on the machine skews latency
    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, device="cpu")
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    task = load_task(bundle.manifest["source"]["data"])
    encoded = encoder.tokenize([e.text for e in task.test], [e.text_pair for e in task.test] if task.is_pair else None)
    cost_model = EwmaCostModel(engine.num_layers)
    warm_up(engine, cost_model, batch_limit(engine), bundle.max_length)
    if args.capacity:
        capacities, cap = {}, args.capacity
    else:
        capacities = {name: await capacity(name, engine, cost_model, encoded, bundle.default_threshold) for name in args.policies}
        print("capacity of the mix (closed loop), items/s: " + ", ".join(f"{k} {v:.0f}" for k, v in capacities.items()))
        cap = capacities[args.policies[0]]

    results = {}
    for load in args.loads:
        stream = make_stream(encoded, bundle.default_threshold, load * cap, args.seconds, seed=0, budget_ms=args.budget_ms)
        results[f"load_{load}"] = {"arrival_items_per_s": round(load * cap, 1), "requests": len(stream)}
        for name in args.policies:
            r = await run_policy(name, engine, cost_model, stream)
            results[f"load_{load}"][name] = r
            budget_p99 = "all refused" if r["budget"]["p99_ms"] is None else f"{r['budget']['p99_ms']:6.2f}"
            print(f"load {load:.1f} {name:<16} p50 {r['p50_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f}  p99 {r['p99_ms']:7.2f}  "
                  f"easy p50 {r['easy']['p50_ms']:6.2f}  full p50 {r['full']['p50_ms']:6.2f}  "
                  f"budget p99 {budget_p99} over {r['budget']['answered_over_budget']:6.1%} "
                  f"refused {r['budget']['refused']}/{r['budget']['requests']}  "
                  f"rows/call {r['rows_per_layer_call']:5.2f}  exit {r['avg_exit_layer']:.2f}")

    report = {
        "what": "scheduler policy under a mixed open-loop stream, in process (no HTTP)",
        "bundle": {"path": str(args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle),
                   "model": bundle.manifest.get("model_name"), "num_layers": bundle.num_layers, "precision": bundle.precision,
                   "max_length": bundle.max_length, "default_threshold": bundle.default_threshold},
        "texts": f"{task.name} test split ({len(task.test)} texts)",
        "mix": {kind: {"share": share, "texts": n, "threshold": "0 (full depth)" if kind == "full" else "bundle default",
                       "budget_ms": args.budget_ms if kind == "budget" else None} for kind, (share, n) in KINDS.items()},
        "max_batch": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS, "stream_seconds": args.seconds,
        "capacity_items_per_s": {name: round(v, 1) for name, v in capacities.items()} or {"given": cap},
        "onnxruntime_threads": default_threads(), "loadavg_1min_at_start": load_at_start, "environment": environment(),
        "results": results,
        "run_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, report)
    print(f"wrote {args.out} in {report['run_seconds']} s")


if __name__ == "__main__":
    asyncio.run(main())
