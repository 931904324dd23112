"""Which backend serves a bundle fastest without costing accuracy, measured at export on dev.

Candidates: onnxruntime's CPU provider on each exported bundle's own files (fp32, and int8 with
`--precision auto`), and, where the OpenVINO plugin offers a CPU device, OpenVINO in bf16
(AMX/AVX512-BF16 CPUs) and f32 on the fp32 files. Each runs the dev split through the serving
engine; a candidate is eligible when its full-depth dev accuracy is within 0.5 point of the fp32
reference (the PyTorch model) and at least 99% of dev rows leave at the same exit as the
reference's at the bundle's default threshold; the eligible one with the most items/s (length-
sorted batches of 64, the candidates taking turns, see measure) is recorded as the bundle's
`backend`, which `romebert serve --backend auto` uses, and its files are the ones published.
A faster candidate turned away for its exits alone is named in the export's output (`report`).
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np

from romebert.core.bundle import Bundle, load_bundle
from romebert.core.engine import Engine, openvino_available, run_early_exit
from romebert.core.exits import exit_layers
from romebert.core.tokenization import LengthBatches
from romebert.model_export.calibrate import exit_logits_onnx

MAX_ACCURACY_DROP = 0.005
MIN_EXIT_AGREEMENT = 0.99


def candidates(bundles: list[Bundle]) -> list[tuple[str, str, Bundle]]:
    """(backend, precision, bundle): onnxruntime on every bundle's own files, OpenVINO (bf16 and
    f32 compute) on the fp32 files, else on the first bundle's."""
    found = [("onnxruntime", b.precision, b) for b in bundles]
    on = next((b for b in bundles if b.precision == "fp32"), bundles[0])
    if openvino_available() and on.precision in ("fp32", "int8"):
        found += [("openvino", "bf16", on), ("openvino", "f32", on)]
    return found


def measure_in_fresh_process(roots: list[Path], dev: LengthBatches, labels: np.ndarray, reference: np.ndarray,
                             log=print) -> tuple[list[dict], dict]:
    """`measure` in a new process that never imported torch, as the server runs: in the export's
    own process PyTorch's threads, once the model has run, slowed every backend (OpenVINO bf16
    from 2x onnxruntime's items/s to 1.1x, measured)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows, choice = pool.apply(_measure_bundles, ([str(r) for r in roots], dev, labels, reference))
    report(rows, choice, log)
    return rows, choice


def report(rows: list[dict], choice: dict, log=print) -> None:
    """A line per candidate, the choice, and each faster candidate turned away for its exits alone."""
    for row in rows:
        log(f"  {row['backend']}/{row['precision']} on the {row['files']} files: " + (row.get("error") or
            f"dev accuracy {100 * row['dev_accuracy']:.2f} (fp32 {100 * choice['reference_dev_accuracy']:.2f}), "
            f"exits as fp32 {100 * row['exit_agreement']:.1f}% at threshold {row['threshold']}, "
            f"{row['items_per_s']:.0f} items/s (median of its passes), a row alone {row['lone_row_p50_ms']:.2f} ms (p50)"))
    log(f"  chosen: {choice['backend']}/{choice['precision']} on the {choice['files']} files")
    for row, speed_up in faster_but_for_exits(rows, choice):
        log(f"  not chosen: {row['backend']}/{row['precision']}, {speed_up:.2f}x the chosen one's items/s and accurate enough, but it leaves "
            f"{100 * (1 - row['exit_agreement']):.1f}% of dev rows at another exit than fp32's (the rule allows "
            f"{100 * (1 - MIN_EXIT_AGREEMENT):g}%); to serve it anyway: romebert export --precision {row['files']}, "
            f"romebert serve {serve_flags(row)} (docs/export.md)")


def serve_flags(row: dict) -> str:
    """The `romebert serve` flags that run a candidate's backend and precision."""
    return f"--backend openvino --openvino-precision {row['precision']}" if row["backend"] == "openvino" else "--backend onnxruntime"


def _measure_bundles(roots: list[str], *args) -> tuple[list[dict], dict]:
    return measure([load_bundle(r) for r in roots], *args)


def measure(bundles: list[Bundle], dev: LengthBatches, labels: np.ndarray, reference: np.ndarray,
            rounds: int = 5) -> tuple[list[dict], dict]:
    """(a row per candidate, the chosen one). `reference`: fp32 logits of every exit, (L, N, C), split order.

    Each candidate runs as it would be served: at its bundle's default threshold, its exits
    compared with the reference's at that threshold. Speed: every candidate is warmed (a pass that
    pays OpenVINO's per-shape compiles), then the candidates take turns for `rounds` passes over
    dev, so that drift in the machine's load hits them alike; items/s is each one's median pass.
    Each pass also times rows alone (two of every length batch, one call each): the choice is by
    items/s, and a backend that wins there can lose on a lone request (OpenVINO bf16 without AMX),
    which the operator should see.
    """
    reference_acc = float((reference[-1].argmax(-1) == labels).mean())
    rows, engines = [], {}
    for backend, precision, bundle in candidates(bundles):
        key = backend, precision, bundle.precision
        try:
            engines[key] = Engine(bundle, device="cpu", backend=backend, precision=precision), bundle.default_threshold
        except Exception as err:  # noqa: BLE001 - a backend that cannot load this bundle is recorded, not fatal
            rows.append({"backend": backend, "precision": precision, "files": bundle.precision,
                         "error": f"{type(err).__name__}: {err}"[:300], "eligible": False})

    def one_pass(engine: Engine, threshold: float) -> float:
        started = time.perf_counter()
        for b in dev.batches:
            run_early_exit(engine, b, np.full(len(b.lengths), threshold))
        return len(labels) / (time.perf_counter() - started)

    lone_rows = [b.rows([k]) for b in dev.batches for k in sorted({0, len(b.lengths) // 2})]

    def lone_pass(engine: Engine, threshold: float) -> list[float]:
        seconds = []
        for row in lone_rows:
            started = time.perf_counter()
            run_early_exit(engine, row, np.full(1, threshold))
            seconds.append(time.perf_counter() - started)
        return seconds

    for engine, threshold in engines.values():
        one_pass(engine, threshold)
        lone_pass(engine, threshold)
    passes: dict[tuple[str, str, str], list[float]] = {key: [] for key in engines}
    lone: dict[tuple[str, str, str], list[float]] = {key: [] for key in engines}
    for _ in range(rounds):
        for key, (engine, threshold) in engines.items():
            passes[key].append(one_pass(engine, threshold))
            lone[key] += lone_pass(engine, threshold)
    for (backend, precision, files), (engine, threshold) in engines.items():
        logits = exit_logits_onnx(engine, dev)
        accuracy = float((logits[-1].argmax(-1) == labels).mean())
        agreement = float((exit_layers(logits, threshold) == exit_layers(reference, threshold)).mean())
        items_per_s = float(np.median(passes[backend, precision, files]))
        rows.append({"backend": backend, "precision": precision, "files": files, "threshold": threshold, "dev_accuracy": accuracy,
                     "exit_agreement": agreement, "items_per_s": round(items_per_s, 1),
                     "items_per_s_passes": [round(p, 1) for p in passes[backend, precision, files]],
                     "lone_row_p50_ms": round(1000 * float(np.median(lone[backend, precision, files])), 3),
                     "eligible": eligible(accuracy, agreement, reference_acc)})
    return rows, choose(rows) | {"reference_dev_accuracy": reference_acc}


def accurate(accuracy: float, reference_accuracy: float) -> bool:
    return accuracy >= reference_accuracy - MAX_ACCURACY_DROP


def keeps_exits(agreement: float) -> bool:
    return agreement >= MIN_EXIT_AGREEMENT


def eligible(accuracy: float, agreement: float, reference_accuracy: float) -> bool:
    """THE rule a backend must pass to serve a bundle: its accuracy AND its exits, both."""
    return accurate(accuracy, reference_accuracy) and keeps_exits(agreement)


def faster_but_for_exits(rows: list[dict], choice: dict) -> list[tuple[dict, float]]:
    """(row, its items/s over the chosen one's) for each candidate faster than the choice that the
    rule turned away for its exits alone: the trade a user who puts throughput before fp32's exit
    decisions may make (int8 on the default model, docs/export.md), so the export names it."""
    key = lambda r: (r["backend"], r["precision"], r["files"])  # noqa: E731
    chosen = next(r for r in rows if key(r) == key(choice))
    return [(r, r["items_per_s"] / chosen["items_per_s"]) for r in rows
            if "error" not in r and r["items_per_s"] > chosen["items_per_s"]
            and accurate(r["dev_accuracy"], choice["reference_dev_accuracy"]) and not keeps_exits(r["exit_agreement"])]


def choose(rows: list[dict]) -> dict:
    """The fastest eligible row; when none is, the first that loaded (onnxruntime on the
    export's first bundle: fp32 with `--precision auto`)."""
    passed = [r for r in rows if r["eligible"]]
    chosen = max(passed, key=lambda r: r["items_per_s"]) if passed else next(r for r in rows if "error" not in r)
    rule = (f"fastest at its default threshold among those within {100 * MAX_ACCURACY_DROP:g} point of fp32 dev accuracy "
            f"whose exits match fp32's on >= {100 * MIN_EXIT_AGREEMENT:g}% of dev rows")
    return {"backend": chosen["backend"], "precision": chosen["precision"], "files": chosen["files"], "rule": rule}
