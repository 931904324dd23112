"""Training benchmark: RomeBERT vs DeeBERT vs plain fine-tuning, all-MiniLM-L6-v2 on rotten_tomatoes.

Same seed, same epochs (per stage), same batch, lr and max length for every method. Each run is
real training on the real data; the checkpoints land in artifacts/bench/<method> (not committed)
and feed the engine and serve benchmarks. Writes bench/results/train.json and docs/*.png.

    .venv/bin/python bench/train.py            # ~40 min on a 2-core CPU (six runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebert.core.data import encode_examples, load_task  # noqa: E402
from romebert.training.evaluate import evaluate_model  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.training.model import MultiExitBert  # noqa: E402
from romebert.training.plots import plot_per_exit, plot_speedup  # noqa: E402
from romebert.training.train import TrainConfig, train  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402

# (name in the results, TrainConfig overrides): romebert_sd_only is the ablation without GR.
# Exits pool as the backbone was trained (mean for all-MiniLM-L6-v2) unless a run says cls.
RUNS = [
    ("romebert", {"method": "romebert"}),
    ("finetune", {"method": "finetune"}),
    ("deebert", {"method": "deebert"}),
    ("romebert_sd_only", {"method": "romebert", "gradient_regularization": False}),
    # The paper's exit head pools [CLS]; on this mean-pooled backbone that is the hard case.
    ("romebert_cls_exits", {"method": "romebert", "exit_pooling": "cls"}),
    ("deebert_cls_exits", {"method": "deebert", "exit_pooling": "cls"}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--runs", default=",".join(name for name, _ in RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    results_file = ROOT / "bench" / "results" / "train.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    methods = previous.get("methods", {})
    task = load_task("rotten_tomatoes")
    for name, overrides in RUNS:
        if name not in args.runs.split(","):
            continue
        cfg = TrainConfig(
            data="rotten_tomatoes", output=str(args.out / name), epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, max_length=args.max_length, save_every=100, device="cpu", **overrides,
        )
        print(f"=== {name}: {cfg}", flush=True)
        ckpt = train(cfg)
        record = json.loads((ckpt / "training_record.json").read_text())
        model = MultiExitBert.from_checkpoint(ckpt)
        encoded, labels = encode_examples(TextEncoder(ckpt / "tokenizer.json", args.max_length), task.test)
        report = evaluate_model(model, encoded, labels)
        accs = [r["accuracy"] for r in report["per_exit"]]
        entry = {"train_seconds": round(record["train_seconds"], 1), "test_acc_per_exit": accs}
        if name == "finetune":
            entry = {"test_acc_final": accs[-1], "train_seconds": entry["train_seconds"], "test_acc_per_exit_untrained_exits": accs}
        else:
            entry["sweep"] = [{"threshold": r["threshold"], "test_acc": r["accuracy"], "avg_exit_layer": r["avg_exit_layer"]} for r in report["sweep"]]
        entry["dev_history"] = record["history"]
        methods[name] = entry
        result = {
            "dataset": "rotten_tomatoes", "backbone": "all-MiniLM-L6-v2", "num_layers": model.num_layers,
            "split_sizes": task.sizes(), "settings": {"epochs_per_stage": args.epochs, "max_length": args.max_length,
            "batch_size": args.batch_size, "lr": args.lr, "seed": 42, "device": "cpu (2 cores)"},
            "methods": methods,
        }
        write_json(results_file, result)
        print(json.dumps({k: v for k, v in entry.items() if k != "dev_history"}, indent=1), flush=True)
    curves = {k: v["test_acc_per_exit"] for k, v in methods.items() if "test_acc_per_exit" in v}
    references = {f"{k} (final exit)": v["test_acc_final"] for k, v in methods.items() if "test_acc_final" in v}
    plot_per_exit(curves, ROOT / "docs" / "per_exit_accuracy.png", "rotten_tomatoes test: accuracy per exit (MiniLM-L6)", references)
    sweeps = {k: [{"accuracy": r["test_acc"], "avg_exit_layer": r["avg_exit_layer"]} for r in v["sweep"]] for k, v in methods.items() if "sweep" in v}
    plot_speedup(sweeps, 6, ROOT / "docs" / "accuracy_vs_speedup.png", "rotten_tomatoes test: accuracy vs speed-up")


if __name__ == "__main__":
    main()
