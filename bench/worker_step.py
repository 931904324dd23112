"""A lone request's trip through the serving layer, in process: no HTTP, an engine that costs nothing.

The rows of one short text are submitted on an asyncio loop as the route does, a worker thread of
the real scheduler takes them, runs two free layers (bench/instant_server.py's engine: every row
leaves at exit 2), tests the exits and answers, and the loop picks the answer up. What is timed is
the serving layer's own Python and its two thread hops, which a lone request pays on top of the
model. Run by bench/own_cost.py in each checkout it compares (it imports whichever `romebert`
the environment gives it); prints the median microseconds per request last.

    .venv/bin/python bench/worker_step.py artifacts/default-bundle [calls]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.instant_server import InstantEngine  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.service.metrics import Metrics  # noqa: E402
from romebert.service.runtime import Runtime  # noqa: E402
from romebert.service.settings import Settings  # noqa: E402

TEXT = "a gorgeous, witty, seductive movie."


async def lone_requests(runtime: Runtime, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        tokens = runtime.encoder.tokenize([TEXT], None, parallel=False)
        ticket = runtime.scheduler.submit(tokens, runtime.bundle.default_threshold, None, runtime.clock())
        await ticket.future
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.0005)  # a lone client: the worker is back waiting when the next comes
    return times


def main() -> None:
    path = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    bundle = load_bundle(path, verify=False)
    runtime = Runtime(Settings(bundle=path), bundle, Metrics(bundle.num_layers),
                      engine_factory=lambda *_: InstantEngine(bundle.num_layers, 2))
    runtime.load()
    try:
        times = asyncio.run(lone_requests(runtime, calls))
    finally:
        runtime.admission.close()
        runtime.scheduler.join(5)
    print(f"lone request through the serving layer, p50 us: {1e6 * float(np.median(times[calls // 10:])):.1f}")


if __name__ == "__main__":
    main()
