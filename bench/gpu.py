"""One command for a GPU host (at most 8 minutes): the GPU tests, then the CUDA numbers.

1. `pytest -m gpu` (tests/test_gpu.py: IO binding on CUDA against the CPU path with the hidden
   states on the GPU between layers, fp16 against fp32 on the real bundle, the server on CUDA).
2. Full depth, the segmented chain against one monolithic graph, at batch 1, 8, 32 and 128, fp16
   and fp32 (rotten_tomatoes test texts padded to 64 tokens; the candidates take turns per batch);
   early exit at the bundle's default threshold, in items/s.
3. The server on CUDA (fp16 bundle), closed loop at concurrency 1 and 64 for 20 s each.
Writes bench/results/gpu.json.

    python bench/gpu.py --fp32 BUNDLE_FP32 --fp16 BUNDLE_FP16 [--device cuda]

The bundles need the monolithic graph: `romebert export CKPT OUT --precision fp16 --monolithic`.
The host needs no package registry: docs/results.md ("On a GPU") lists the wheels to bring and
how to carry one larger than a transfer allows (bench/wheel_parts.py). `--device cpu` runs the same
steps on a CPU (the GPU tests then skip), to check the script itself anywhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime  # noqa: E402

from bench.harness import environment, measure_side_by_side, one_text_each, padded, romebert_serve, running  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.engine import Engine, open_session, run_early_exit  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.loadtest.driver import run_load  # noqa: E402

BATCHES = (1, 8, 32, 128)
ROWS_PER_POINT = 1024  # texts timed per (precision, batch) point


def gpu_tests(fp32: Path, fp16: Path, out: Path) -> dict:
    report = out / "gpu-tests.xml"
    env = os.environ | {"ROMEBERT_GPU_BUNDLES": f"{fp32}:{fp16}"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", f"--junitxml={report}", str(ROOT / "tests" / "test_gpu.py")],
                   env=env, timeout=240)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"]}


def engine_rows(bundles: dict[str, Path], device: str, texts: list[str], labels: np.ndarray) -> list[dict]:
    rows = []
    for precision, path in bundles.items():
        bundle = load_bundle(path)
        engine = Engine(bundle, device=device)
        monolithic = open_session(bundle.path(bundle.manifest["extras"]["full"]["file"]), device)
        encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
        layers = engine.num_layers

        def full_graph(b):
            (z,) = monolithic.run(None, {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids})
            return z.argmax(-1), np.full(len(z), layers)

        def segmented(threshold: float):
            def run(b):
                z, layer = run_early_exit(engine, b, np.full(len(b.lengths), threshold))
                return z.argmax(-1), layer
            return run

        candidates = {"onnx_monolithic": full_graph, "segmented_full": segmented(0.0), "segmented_default": segmented(bundle.default_threshold)}
        for batch in BATCHES:
            count = min(len(texts), ROWS_PER_POINT) // batch * batch
            batches = [padded(encoder, texts[i:i + batch]) for i in range(0, count, batch)]
            for name, result in measure_side_by_side(candidates, batches, labels).items():
                row = {"engine": name, "precision": precision, "batch": batch} | result
                rows.append(row)
                print(row, flush=True)
    return rows


def serve_rows(bundle: Path, device: str, texts: list[str], out: Path) -> list[dict]:
    workload = one_text_each(texts)
    rows = []
    with running(romebert_serve(bundle, "--device", device), out / "gpu-server.log") as (_, url):
        run_load(url, workload, 8, None, 3, None, 10)  # warm
        for users in (1, 64):
            run = run_load(url, workload, users, None, 20, None, 10)
            ok = [r.latency_ms for r in run.records if r.status == 200]
            rows.append({"concurrency": users, "p50_ms": round(float(np.percentile(ok, 50)), 2), "p99_ms": round(float(np.percentile(ok, 99)), 2),
                         "requests_per_s": round(len(ok) / run.elapsed_s, 1), "errors": len(run.records) - len(ok),
                         "statuses": {str(code): n for code, n in sorted(Counter(r.status for r in run.records).items())}})
            print(rows[-1], flush=True)
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        return done.stdout.strip() or "unknown GPU"
    return environment()["cpu"]["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--fp16", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    started = time.perf_counter()
    scratch = ROOT / "artifacts" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    tests = gpu_tests(args.fp32, args.fp16, scratch)
    print(f"gpu tests: {tests}", flush=True)
    task = load_task(load_bundle(args.fp32).manifest["source"]["data"])
    texts, labels = [e.text for e in task.test], np.array([e.label for e in task.test])
    rows = engine_rows({"fp32": args.fp32, "fp16": args.fp16}, args.device, texts, labels)
    serve = serve_rows(args.fp16, args.device, texts, scratch)
    write_json(args.out, {"device": device_name(args.device), "onnxruntime": onnxruntime.__version__, "rows": rows, "serve": serve,
                          "tests": tests, "seconds": round(time.perf_counter() - started, 1), "environment": environment(),
                          "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]])})
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
