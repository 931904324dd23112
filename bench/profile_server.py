"""Where the server's own time goes under load: a py-spy profile of `romebert serve` at concurrency 32.

The default bundle, its defaults, rotten_tomatoes test texts one per request (the closed loop of
bench/serve.py); py-spy samples every thread of the server process (`--native`, so time inside
onnxruntime shows as such; `--nonblocking` instead with `--instant`) for `--seconds`. The
samples are folded by thread, by the innermost Python function of each stack and by the native
library the stack ended in, and the top entries written to bench/results/profile.json
(docs/results.md quotes them). The event loop's samples are also folded by the stage of a
request they fell in (STAGES: tokenizing, the body guard, uvicorn's parsing and writing, ...).
`--instant` profiles the same server with an engine that costs nothing (bench/instant_server.py):
what is left is the server's own code, issue 14's "server CPU beyond the model".

    pip install py-spy    # not a project dependency: only this script uses it
    .venv/bin/python bench/profile_server.py [--seconds 20]
    .venv/bin/python bench/profile_server.py --instant --out bench/results/profile_instant.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, instant_serve, one_text_each, romebert_serve, running  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.loadtest.driver import run_load  # noqa: E402

BUNDLE = ROOT / "artifacts" / "default-bundle"


def _function(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: one entry per function, whatever line it was on."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if ".py:" in where else frame


def fold(raw: str, top: int) -> dict:
    """py-spy's raw output (`thread (tid): name;frame;...;frame count` per line): the shares of
    the samples by thread, by the innermost Python function (native time below it included), and
    by the native library the innermost frame was in ("python" when it was Python code)."""
    by_thread, by_function, by_library, total = Counter(), Counter(), Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("thread"):
            continue
        thread, *frames = stack.split(";")
        n = int(count)
        total += n
        by_thread[thread.split(": ", 1)[-1]] += n
        python = [f for f in frames if ".py:" in f]
        by_function[_function(python[-1]) if python else "(no Python frame)"] += n
        innermost = frames[-1] if frames else ""
        by_library["python" if ".py:" in innermost else innermost.rpartition("(")[2].rstrip(")").split("/")[-1]] += n
    share = lambda c: [{"what": k, "share": round(v / total, 4)} for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "by_thread": share(by_thread), "by_innermost_python_function": share(by_function),
            "by_innermost_library": share(by_library)}


# A request's stages on the event loop, each named by a function its samples pass through; a
# sample counts under the stage of the innermost such function on its stack.
STAGES = {
    "HttpToolsProtocol.data_received": "uvicorn: reading and parsing",
    "RequestResponseCycle.run_asgi": "uvicorn and FastAPI: the app's entry",
    "ClassifyMetrics.__call__": "the request metrics",
    "RequestGuard.__call__": "the body guard (headers, deadline, byte count)",
    "DirectRoute.__call__": "the route, apart from the stages below",
    "read_body": "reading the body",
    "BaseModel.model_validate_json": "validating the body",
    "TextEncoder.tokenize": "tokenizing",
    "Scheduler.submit": "admission and submit",
    "answers_of": "awaiting the answer",
    "render": "rendering the answer",
    "RequestResponseCycle.send": "uvicorn: writing",
    "LoopLag.seconds": "the loop-lag probe",
}
LOOP_ITSELF = "Runner.run"  # as the innermost Python frame: uvloop's own C code (polling, sockets, callbacks)


def stages(raw: str, thread: str = "MainThread") -> dict[str, float]:
    """The shares of `thread`'s samples by STAGES (prefix matches, so a stage's closures count
    with it), uvloop's own code when no Python runs above the loop, "elsewhere" for the rest."""
    counts, total = Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        head, *frames = stack.split(";")
        if not head.startswith("thread") or not head.endswith(f": {thread}"):
            continue
        names = [frame.partition(" (")[0] for frame in frames if ".py:" in frame]
        stage = next((STAGES[key] for name in reversed(names) for key in STAGES if name == key or name.startswith(key + ".")),
                     "uvloop's own loop (polling, sockets)" if names[-1:] == [LOOP_ITSELF] else "elsewhere")
        counts[stage] += int(count)
        total += int(count)
    return {stage: round(n / total, 4) for stage, n in counts.most_common()} if total else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--instant", action="store_true", help="the server with an engine that costs nothing (its own code only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.json")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    task = load_task("rotten_tomatoes")
    workload = one_text_each([e.text for e in task.test])
    out = ROOT / "artifacts" / "bench" / "profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    server = instant_serve(args.bundle) if args.instant else romebert_serve(args.bundle)
    with running(server, out.with_suffix(".log")) as (proc, url):
        run_load(url, workload, 32, None, 5, None, 30.0)  # warm
        # The load runs in this (main) thread, which its signal handlers need, and py-spy beside it.
        # With no model the server's own Python is all there is, and a sampler that stops the process
        # to read it stalls the event loop into refusing requests (its loop-lag door): `--nonblocking`
        # there, which py-spy allows only without native frames.
        how = ["--nonblocking"] if args.instant else ["--native"]
        spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--duration", str(args.seconds), "--rate", "200", *how,
                                "--threads", "--format", "raw", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load = run_load(url, workload, 32, None, args.seconds + 5, None, 30.0)
        if spy.wait() != 0:
            raise SystemExit(f"py-spy failed: {spy.stderr.read()}")
    statuses = Counter(str(r.status) for r in load.records)
    raw = out.read_text()
    result = fold(raw, args.top) | {"event_loop_by_stage": stages(raw), "server": "instant" if args.instant else "romebert serve",
                                    "load_statuses": dict(statuses),
                                    "seconds": args.seconds, "concurrency": 32, "environment": environment()}
    for part in ("by_thread", "by_innermost_python_function", "by_innermost_library"):
        print(part)
        for row in result[part]:
            print(f"  {100 * row['share']:5.1f}%  {row['what'][:110]}")
    print(f"the load's answers by status: {dict(statuses)}")
    print("the event loop's samples by stage")
    for stage, share in result["event_loop_by_stage"].items():
        print(f"  {100 * share:5.1f}%  {stage}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
