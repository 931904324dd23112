"""The server's own cost, this checkout against an older one, in turns (issue 14's 0.3 core-ms a request).

Each checkout's bench/instant_server.py (the real server, its engine replaced by one that costs
nothing, so what is measured is the server's own code) up at once on the default bundle;
`romebert loadtest`'s driver (closed loop, the test texts one per request) at concurrency 32 and
then 1, N rounds, the order of the two servers swapped every round; CPU by psutil on each
server's PID (the load generator does not count), split into the event loop's thread and the
others. This machine's speed drifts by 10-30% within minutes, more than a change to the server's
own code moves it, so a change is read from the ratios within each round, not from one pass.
Then, in process, a lone request's trip through each checkout's serving layer (bench/worker_step.py:
submit, the worker's steps with the same free engine, the answer back on the loop; no HTTP), in
turns, each time in a fresh process.
Writes bench/results/own_cost.json (--out: elsewhere).

    git worktree add /tmp/before HEAD     # before the change
    .venv/bin/python bench/own_cost.py --before /tmp/before [--rounds 3] [--seconds 15]   # about 5 minutes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import checkout_commit, environment, in_turns, older_checkout, one_text_each, running  # noqa: E402
from bench.serve import BUNDLE, measure, split_of, test_split  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.files import write_json  # noqa: E402

FIGURES = ("server_cpu_ms_per_request", "loop_cpu_ms_per_request", "other_threads_cpu_ms_per_request", "requests_per_s", "p50_ms")


def serving_layer_us(checkout: Path, env: dict | None, bundle: Path, calls: int = 3000) -> float:
    """bench/worker_step.py's p50 (µs) with the serving layer of `checkout` (`env` imports it)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "worker_step.py"), str(bundle), str(calls)],
                         env=None if env is None else os.environ | env, cwd=checkout, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the older commit (git worktree add)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="per server, concurrency and round (c1 gets two thirds)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "own_cost.json")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    texts, _ = test_split(*split_of(ROOT / bundle.manifest["source"]["checkpoint"]))
    workload = one_text_each(texts)
    logs = ROOT / "artifacts" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    steps: dict[str, list[dict]] = {"ours": [], "before": []}
    with ExitStack() as stack:
        _, older_env = stack.enter_context(older_checkout(args.before))
        commands = {
            "ours": ([sys.executable, str(ROOT / "bench" / "instant_server.py"), str(args.bundle.resolve())], None, None),
            "before": ([sys.executable, str(args.before.resolve() / "bench" / "instant_server.py"), str(args.bundle.resolve())],
                       older_env, args.before),
        }
        servers = {name: stack.enter_context(running(command, logs / f"own-cost-{name}.log", env, cwd))
                   for name, (command, env, cwd) in commands.items()}
        for proc, url in servers.values():
            measure(url, proc.pid, workload, 32, 5)  # warm
        for k in range(args.rounds):
            for name in in_turns(list(servers), k):
                proc, url = servers[name]
                steps[name].append({"round": k + 1, "c32": measure(url, proc.pid, workload, 32, args.seconds),
                                    "c1": measure(url, proc.pid, workload, 1, 2 * args.seconds / 3)})
                time.sleep(1)
            print(f"round {k + 1}: " + "; ".join(
                f"{name} c32 {steps[name][-1]['c32']['server_cpu_ms_per_request']} core-ms, c1 p50 {steps[name][-1]['c1']['p50_ms']} ms"
                for name in steps), flush=True)
        layer_us: dict[str, list[float]] = {"ours": [], "before": []}
        for k in range(args.rounds):
            checkouts = {"ours": (ROOT, None), "before": (args.before, older_env)}
            for name in in_turns(list(checkouts), k):
                layer_us[name].append(serving_layer_us(*checkouts[name], args.bundle.resolve()))

    ratios = {f"{c}_{figure}": [round(a[c][figure] / b[c][figure], 3) for a, b in zip(steps["ours"], steps["before"])]
              for c in ("c32", "c1") for figure in FIGURES}
    medians = {name: {f"{c}_{figure}": round(float(np.median([s[c][figure] for s in steps[name]])), 3)
                      for c in ("c32", "c1") for figure in FIGURES} for name in steps}
    result = {"bundle": str(args.bundle), "before": {"path": str(args.before), "commit": checkout_commit(args.before)},
              "rounds": args.rounds, "seconds": args.seconds, "medians": medians, "ours_over_before_by_round": ratios,
              "serving_layer_lone_p50_us": layer_us, "steps": steps, "environment": environment()}
    write_json(args.out, result)

    print(f"\n{'':34} {'ours':>10} {'before':>10}   ours/before by round")
    for key in medians["ours"]:
        print(f"{key:34} {medians['ours'][key]:>10} {medians['before'][key]:>10}   {ratios[key]}")
    print(f"{'serving layer, lone p50 µs':34} {np.median(layer_us['ours']):>10.1f} {np.median(layer_us['before']):>10.1f}   "
          f"{[round(a / b, 3) for a, b in zip(layer_us['ours'], layer_us['before'])]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
