"""Which backend serves a bundle fastest without costing accuracy, measured at export on dev.

Candidates: onnxruntime's CPU provider on the bundle's own files, and, when the OpenVINO plugin
is installed, OpenVINO in bf16 (AMX/AVX512-BF16 CPUs) and f32 on the same files. Each runs the
dev split through the serving engine; a candidate is eligible when its full-depth dev accuracy is
within 0.5 point of the fp32 reference (the PyTorch model) and at least 99% of dev rows leave at
the same exit as the reference's at the default threshold; the eligible one with the most items/s
at the default threshold (length-sorted batches of 32, after a warm pass that pays OpenVINO's
per-shape compiles) is recorded as the bundle's `backend`, which `romebert serve --backend auto`
uses.
"""

from __future__ import annotations

import time

import numpy as np

from romebert.core.bundle import Bundle
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


def measure(bundle: Bundle, batches: list[Encoded], order: np.ndarray, labels: np.ndarray, reference: np.ndarray,
            threshold: float, log=print) -> tuple[list[dict], dict]:
    """(a row per candidate, the chosen one). `reference`: fp32 logits of every exit, (L, N, C), split order."""
    reference_exits = exit_layers(reference, threshold)
    reference_acc = float((reference[-1].argmax(-1) == labels).mean())
    rows = []
    for backend, precision in candidates(bundle):
        try:
            engine = Engine(bundle, device="cpu", backend=backend, precision=precision)
        except Exception as err:  # noqa: BLE001 - a backend that cannot load this bundle is recorded, not fatal
            rows.append({"backend": backend, "precision": precision, "error": f"{type(err).__name__}: {err}"[:300], "eligible": False})
            continue
        logits = np.empty_like(reference)
        logits[:, order] = np.concatenate([engine.all_exit_logits(b) for b in batches], axis=1)
        thresholds = [np.full(len(b.lengths), threshold) for b in batches]
        for b, t in zip(batches, thresholds):  # warm pass: OpenVINO compiles each new shape once
            run_early_exit(engine, b, t)
        started = time.perf_counter()
        for b, t in zip(batches, thresholds):
            run_early_exit(engine, b, t)
        items_per_s = len(labels) / (time.perf_counter() - started)
        accuracy = float((logits[-1].argmax(-1) == labels).mean())
        agreement = float((exit_layers(logits, threshold) == reference_exits).mean())
        row = {"backend": backend, "precision": precision, "dev_accuracy": accuracy, "exit_agreement": agreement,
               "items_per_s": round(items_per_s, 1),
               "eligible": accuracy >= reference_acc - MAX_ACCURACY_DROP and agreement >= MIN_EXIT_AGREEMENT}
        rows.append(row)
        log(f"  {backend}/{precision}: dev accuracy {100 * accuracy:.2f} (fp32 {100 * reference_acc:.2f}), "
            f"exits as fp32 {100 * agreement:.1f}%, {items_per_s:.0f} items/s")
    eligible = [r for r in rows if r["eligible"]]
    chosen = max(eligible, key=lambda r: r["items_per_s"]) if eligible else rows[0]
    rule = (f"fastest at the default threshold among those within {100 * MAX_ACCURACY_DROP:g} point of fp32 dev accuracy "
            f"whose exits match fp32's on >= {100 * MIN_EXIT_AGREEMENT:g}% of dev rows")
    return rows, {"backend": chosen["backend"], "precision": chosen["precision"], "rule": rule, "reference_dev_accuracy": reference_acc}
