"""Which backend serves a bundle fastest without costing accuracy, measured at export on dev.

Candidates: onnxruntime's CPU provider on the bundle's own files, and, when the OpenVINO plugin
is installed, OpenVINO in bf16 (AMX/AVX512-BF16 CPUs) and f32 on the same files. Each runs the
dev split through the serving engine; a candidate is eligible when its full-depth dev accuracy is
within 0.5 point of the fp32 reference (the PyTorch model) and at least 99% of dev rows leave at
the same exit as the reference's at the default threshold; the eligible one with the most items/s
at the default threshold (length-sorted batches of 64, the candidates taking turns, see measure)
is recorded as the bundle's `backend`, which `romebert serve --backend auto` uses.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np

from romebert.core.bundle import Bundle, load_bundle
from romebert.core.engine import Engine, openvino_device, run_early_exit
from romebert.core.exits import exit_layers
from romebert.core.tokenization import Encoded

MAX_ACCURACY_DROP = 0.005
MIN_EXIT_AGREEMENT = 0.99


def candidates(bundle: Bundle) -> list[tuple[str, str]]:
    found = [("onnxruntime", bundle.precision)]
    if openvino_device() is not None and bundle.precision in ("fp32", "int8"):
        found += [("openvino", "bf16"), ("openvino", "f32")]
    return found


def measure_in_fresh_process(root: Path, batches: list[Encoded], order: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                             threshold: float, log=print) -> tuple[list[dict], dict]:
    """`measure` in a new process that never imported torch, as the server runs: in the export's
    own process PyTorch's threads, once the model has run, slowed every backend (OpenVINO bf16
    from 2x onnxruntime's items/s to 1.1x, measured)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows, choice = pool.apply(_measure_bundle, (str(root), batches, order, labels, reference, threshold))
    for row in rows:
        log(f"  {row['backend']}/{row['precision']}: " + (row.get("error") or
            f"dev accuracy {100 * row['dev_accuracy']:.2f} (fp32 {100 * choice['reference_dev_accuracy']:.2f}), "
            f"exits as fp32 {100 * row['exit_agreement']:.1f}%, {row['items_per_s']:.0f} items/s (median of its passes)"))
    return rows, choice


def _measure_bundle(root: str, *args) -> tuple[list[dict], dict]:
    return measure(load_bundle(root), *args)


def measure(bundle: Bundle, batches: list[Encoded], order: np.ndarray, labels: np.ndarray, reference: np.ndarray,
            threshold: float, rounds: int = 5) -> tuple[list[dict], dict]:
    """(a row per candidate, the chosen one). `reference`: fp32 logits of every exit, (L, N, C), split order.

    Speed: every candidate is warmed (a pass that pays OpenVINO's per-shape compiles), then the
    candidates take turns for `rounds` passes over dev, so that drift in the machine's load hits
    them alike; items/s is each one's median pass.
    """
    reference_exits = exit_layers(reference, threshold)
    reference_acc = float((reference[-1].argmax(-1) == labels).mean())
    rows, engines = [], {}
    for backend, precision in candidates(bundle):
        try:
            engines[backend, precision] = Engine(bundle, device="cpu", backend=backend, precision=precision)
        except Exception as err:  # noqa: BLE001 - a backend that cannot load this bundle is recorded, not fatal
            rows.append({"backend": backend, "precision": precision, "error": f"{type(err).__name__}: {err}"[:300], "eligible": False})
    thresholds = [np.full(len(b.lengths), threshold) for b in batches]

    def one_pass(engine: Engine) -> float:
        started = time.perf_counter()
        for b, t in zip(batches, thresholds):
            run_early_exit(engine, b, t)
        return len(labels) / (time.perf_counter() - started)

    for engine in engines.values():
        one_pass(engine)
    passes: dict[tuple[str, str], list[float]] = {key: [] for key in engines}
    for _ in range(rounds):
        for key, engine in engines.items():
            passes[key].append(one_pass(engine))
    for (backend, precision), engine in engines.items():
        logits = np.empty_like(reference)
        logits[:, order] = np.concatenate([engine.all_exit_logits(b) for b in batches], axis=1)
        accuracy = float((logits[-1].argmax(-1) == labels).mean())
        agreement = float((exit_layers(logits, threshold) == reference_exits).mean())
        items_per_s = float(np.median(passes[backend, precision]))
        row = {"backend": backend, "precision": precision, "dev_accuracy": accuracy, "exit_agreement": agreement,
               "items_per_s": round(items_per_s, 1), "items_per_s_passes": [round(p, 1) for p in passes[backend, precision]],
               "eligible": accuracy >= reference_acc - MAX_ACCURACY_DROP and agreement >= MIN_EXIT_AGREEMENT}
        rows.append(row)
    eligible = [r for r in rows if r["eligible"]]
    chosen = max(eligible, key=lambda r: r["items_per_s"]) if eligible else rows[0]
    rule = (f"fastest at the default threshold among those within {100 * MAX_ACCURACY_DROP:g} point of fp32 dev accuracy "
            f"whose exits match fp32's on >= {100 * MIN_EXIT_AGREEMENT:g}% of dev rows")
    return rows, {"backend": chosen["backend"], "precision": chosen["precision"], "rule": rule, "reference_dev_accuracy": reference_acc}
