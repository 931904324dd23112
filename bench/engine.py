"""Engine benchmark (in-process, this CPU): PyTorch eager vs one ONNX graph vs the segmented chain.

Real model: the default checkpoint (`make serve`'s), exported fp32 and int8; on onnxruntime's CPU
provider and on OpenVINO's CPU plugin in bf16 and f32 (the backend rows). Inputs: the
rotten_tomatoes test split, every row padded to sequence length 64. Batch 1 over the first 300
test texts, batch 32 over all 853; the onnxruntime candidates take turns on each batch
(round-robin), PyTorch runs on a pass of its own. Writes bench/results/engine.json and prints a table.

    .venv/bin/python bench/engine.py [--out bench/results/engine.json]   # needs artifacts/default-checkpoint (make serve)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from romebert.model_export.segments import FullDepthModel  # noqa: E402
from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.engine import Engine, default_threads, open_openvino_session, open_session, openvino_available, run_early_exit  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.core.data import load_task  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.training.model import MultiExitBert  # noqa: E402
from bench.harness import SEQ_LEN, environment, exported, measure_side_by_side, padded  # noqa: E402

CHECKPOINT = ROOT / "artifacts" / "default-checkpoint"


def bundle_for(precision: str, attention: str = "classic") -> Path:
    suffix = "" if attention == "classic" else f"-{attention}-attention"
    return exported(CHECKPOINT, ROOT / "artifacts" / "bench" / f"bundle-{precision}{suffix}", precision=precision, attention=attention, monolithic=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json",
                        help="where the results go (a run on another CPU model keeps the committed one: e.g. engine_amd.json)")
    args = parser.parse_args()
    threads = default_threads()
    torch.set_num_threads(threads)
    task = load_task("rotten_tomatoes")
    texts, labels = [e.text for e in task.test], np.array([e.label for e in task.test])
    bundles = {p: load_bundle(bundle_for(p)) for p in ("fp32", "int8")}
    bundles["fp32_unfused"] = load_bundle(bundle_for("fp32", attention="eager"))  # to measure attention fusion
    encoder = TextEncoder(bundles["fp32"].tokenizer_file, SEQ_LEN)
    model = MultiExitBert.from_checkpoint(CHECKPOINT, attn_implementation="eager")
    full_torch = FullDepthModel(model).eval()
    full_graph = bundles["fp32"].path(bundles["fp32"].manifest["extras"]["full"]["file"])
    monolithic = open_session(full_graph, "cpu", threads)
    engines = {p: Engine(b, device="cpu", threads=threads) for p, b in bundles.items()}
    openvino = {p: Engine(bundles["fp32"], backend="openvino", precision=p, threads=threads) for p in ("bf16", "f32")} if openvino_available() else {}
    monolithic_openvino = {p: open_openvino_session(full_graph, p, threads) for p in openvino}
    default_t = bundles["fp32"].default_threshold

    @torch.no_grad()
    def torch_eager(b):
        z = full_torch(*(torch.from_numpy(x) for x in (b.input_ids, b.attention_mask, b.token_type_ids)))
        return z.argmax(-1).numpy(), np.full(len(z), model.num_layers)

    def full_on(session):
        def run(b):
            (z,) = session.run(None, {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids})
            return z.argmax(-1), np.full(len(z), model.num_layers)
        return run

    def segmented(precision: str, threshold: float, engine=None):
        engine = engine or engines[precision]
        t = bundles[precision].default_threshold if threshold < 0 else threshold

        def run(b):
            z, layer = run_early_exit(engine, b, np.full(len(b.lengths), t))
            return z.argmax(-1), layer

        return run

    candidates = {
        "pytorch_eager": torch_eager,
        "onnx_monolithic": full_on(monolithic),
        "segmented_full": segmented("fp32", 0.0),
        "segmented_default": segmented("fp32", -1),
        "segmented_full_int8": segmented("int8", 0.0),
        "segmented_default_int8": segmented("int8", -1),
        "segmented_full_unfused_attention": segmented("fp32_unfused", 0.0),
    }
    for p, engine in openvino.items():  # the same fp32 files, OpenVINO computing in p
        candidates[f"onnx_monolithic_openvino_{p}"] = full_on(monolithic_openvino[p])
        candidates[f"segmented_full_openvino_{p}"] = segmented("fp32", 0.0, engine)
        candidates[f"segmented_default_openvino_{p}"] = segmented("fp32", -1, engine)
    rows = []
    for batch_size, count in ((1, 300), (32, len(texts))):
        batches = [padded(encoder, texts[i : i + batch_size]) for i in range(0, count, batch_size)]
        for name in candidates:  # OpenVINO compiles each new shape once: not in the timings
            if "openvino" in name:
                candidates[name](batches[0])
        # PyTorch runs on its own pass: its OpenMP threads keep spinning after each call and would
        # slow whichever onnxruntime call came next. The onnxruntime candidates take turns.
        results = measure_side_by_side({"pytorch_eager": torch_eager}, batches, labels)
        results |= measure_side_by_side({k: v for k, v in candidates.items() if k != "pytorch_eager"}, batches, labels)
        for name in candidates:
            row = {"engine": name, "batch": batch_size} | results[name]
            rows.append(row)
            print(f"{name:<24} batch {batch_size:>2}: p50 {row['p50_ms']:8.2f} ms  {row['items_per_s']:8.1f} items/s  "
                  f"acc {100 * row['test_acc']:.2f}  avg exit {row['avg_exit_layer']:.2f}", flush=True)
    by = {(r["engine"], r["batch"]): r for r in rows}
    ratios = {
        "segmented_full_over_monolithic_p50_b1": by["segmented_full", 1]["p50_ms"] / by["onnx_monolithic", 1]["p50_ms"],
        "segmented_full_over_monolithic_p50_b32": by["segmented_full", 32]["p50_ms"] / by["onnx_monolithic", 32]["p50_ms"],
        "default_over_full_items_per_s_b32": by["segmented_default", 32]["items_per_s"] / by["segmented_full", 32]["items_per_s"],
        "default_over_full_items_per_s_b1": by["segmented_default", 1]["items_per_s"] / by["segmented_full", 1]["items_per_s"],
        "int8_over_fp32_items_per_s_full_b32": by["segmented_full_int8", 32]["items_per_s"] / by["segmented_full", 32]["items_per_s"],
        "int8_over_fp32_items_per_s_full_b1": by["segmented_full_int8", 1]["items_per_s"] / by["segmented_full", 1]["items_per_s"],
        "fused_over_unfused_attention_items_per_s_b1": by["segmented_full", 1]["items_per_s"] / by["segmented_full_unfused_attention", 1]["items_per_s"],
        "fused_over_unfused_attention_items_per_s_b32": by["segmented_full", 32]["items_per_s"] / by["segmented_full_unfused_attention", 32]["items_per_s"],
    }
    for p in openvino:
        for b in (1, 32):
            ratios[f"openvino_{p}_over_onnxruntime_fp32_items_per_s_default_b{b}"] = by[f"segmented_default_openvino_{p}", b]["items_per_s"] / by["segmented_default", b]["items_per_s"]
    for k, v in ratios.items():
        print(f"{k:<42} {v:.3f}")
    write_json(args.out, {
        "environment": environment(), "seq_len": SEQ_LEN, "threads": threads, "default_threshold": default_t,
        "int8_default_threshold": bundles["int8"].default_threshold, "rows": rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    })


if __name__ == "__main__":
    main()
