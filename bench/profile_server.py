"""Where the server's own time goes under load: a py-spy profile of `romebert serve` at concurrency 32.

The default bundle, its defaults, rotten_tomatoes test texts one per request (the closed loop of
bench/serve.py); py-spy samples every thread of the server process (`--native`, so time inside
onnxruntime shows as such, `--idle` off: waiting threads are not counted) for `--seconds`. The
samples are folded by thread, by the innermost Python function of each stack and by the native
library the stack ended in, and the top entries written to bench/results/profile.json
(docs/results.md quotes them).

    pip install py-spy    # not a project dependency: only this script uses it
    .venv/bin/python bench/profile_server.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import environment, one_text_each, romebert_serve, running  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    task = load_task("rotten_tomatoes")
    workload = one_text_each([e.text for e in task.test])
    out = ROOT / "artifacts" / "bench" / "profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with running(romebert_serve(args.bundle), out.with_suffix(".log")) as (proc, url):
        run_load(url, workload, 32, None, 5, None, 30.0)  # warm
        load = threading.Thread(target=run_load, args=(url, workload, 32, None, args.seconds + 5, None, 30.0))
        load.start()
        subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--duration", str(args.seconds), "--rate", "200", "--native",
                        "--threads", "--format", "raw", "--output", str(out)], check=True, capture_output=True)
        load.join()
    result = fold(out.read_text(), args.top) | {"seconds": args.seconds, "concurrency": 32, "environment": environment()}
    for part in ("by_thread", "by_innermost_python_function", "by_innermost_library"):
        print(part)
        for row in result[part]:
            print(f"  {100 * row['share']:5.1f}%  {row['what'][:110]}")
    write_json(ROOT / "bench" / "results" / "profile.json", result)


if __name__ == "__main__":
    main()
