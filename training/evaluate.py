"""How accuracy trades against depth: each exit forced, and the entropy-threshold sweep.

Exit selection goes through core.exits, the very rule the server applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from romebert.core.exits import sweep
from romebert.core.tokenization import Encoded, TextEncoder


@torch.no_grad()
def exit_logits(model, encoded: Encoded, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Logits of every exit for every row, (L, N, C), in batches sorted by length (little padding)."""
    model.eval()
    order = np.argsort(encoded.lengths, kind="stable")
    out = np.zeros((model.num_layers, len(order), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = encoded.rows(idx)
        logits = model(
            torch.from_numpy(batch.input_ids).to(device),
            torch.from_numpy(batch.attention_mask).to(device),
            torch.from_numpy(batch.token_type_ids).to(device),
        )
        out[:, idx] = logits.float().cpu().numpy()
    return out


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = float(((pred == positive) & (labels == positive)).sum())
    fp = float(((pred == positive) & (labels != positive)).sum())
    fn = float(((pred != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def per_exit_metrics(logits: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Accuracy (and F1 of class 1 for binary tasks) when every sample is forced out at each exit."""
    rows = []
    binary = logits.shape[-1] == 2
    for layer, z in enumerate(logits, start=1):
        pred = z.argmax(-1)
        row = {"exit": layer, "accuracy": float((pred == labels).mean())}
        if binary:
            row["f1"] = f1_binary(pred, labels)
        rows.append(row)
    return rows


def evaluate_model(model, encoded: Encoded, labels: np.ndarray, batch_size: int = 128, device: str = "cpu") -> dict:
    """Per-exit metrics and the threshold sweep of one model on one labelled split."""
    logits = exit_logits(model, encoded, batch_size, device)
    return {"per_exit": per_exit_metrics(logits, labels), "sweep": sweep(logits, labels), "num_layers": model.num_layers}


def format_report(name: str, report: dict) -> str:
    per_exit = report["per_exit"]
    lines = [f"== {name}", "exit      " + " ".join(f"{r['exit']:>6}" for r in per_exit)]
    lines.append("accuracy  " + " ".join(f"{100 * r['accuracy']:6.2f}" for r in per_exit))
    lines.append(f"{'threshold':>9} {'accuracy':>9} {'avg layer':>9} {'speed-up':>9}")
    for r in report["sweep"]:
        lines.append(f"{r['threshold']:9.3f} {100 * r['accuracy']:9.2f} {r['avg_exit_layer']:9.2f} {r['speedup']:8.2f}x")
    return "\n".join(lines)


def evaluate_checkpoints(
    checkpoints: list[Path], data: str | None, split: str, out: Path, batch_size: int = 128, limit: int | None = None
) -> dict:
    """Evaluate checkpoints side by side; print tables, write evaluation.json and two plots."""
    from romebert.training.checkpoint import RECORD_NAME
    from romebert.core.data import encode_examples, load_task
    from romebert.core.files import write_json
    from romebert.training.model import MultiExitBert
    from romebert.training.plots import plot_per_exit, plot_speedup

    results = {}
    for ckpt in checkpoints:
        ckpt = Path(ckpt)
        record = json.loads((ckpt / RECORD_NAME).read_text()) if (ckpt / RECORD_NAME).is_file() else {}
        source = data or record.get("config", {}).get("data")
        if not source:
            raise ValueError(f"{ckpt}: no --data given and the checkpoint does not record its dataset")
        seed = record.get("config", {}).get("seed", 42)
        task = load_task(source, seed=seed, limit=limit)
        model = MultiExitBert.from_checkpoint(ckpt)
        encoder = TextEncoder(ckpt / "tokenizer.json", getattr(model.config, "max_seq_length", 128))
        encoded, labels = encode_examples(encoder, getattr(task, split))
        report = evaluate_model(model, encoded, labels, batch_size)
        report.update({"checkpoint": str(ckpt), "method": record.get("method", ckpt.name), "data": task.name, "split": split, "size": len(labels)})
        name = report["method"] if report["method"] not in results else ckpt.name
        results[name] = report
        print(format_report(f"{name} ({task.name} {split}, n={len(labels)})", report))
    out = Path(out)
    write_json(out / "evaluation.json", results)
    num_layers = next(iter(results.values()))["num_layers"]
    plot_per_exit({k: [r["accuracy"] for r in v["per_exit"]] for k, v in results.items()}, out / "per_exit_accuracy.png", f"accuracy per exit ({split})")
    plot_speedup({k: v["sweep"] for k, v in results.items()}, num_layers, out / "accuracy_vs_speedup.png", f"accuracy vs speed-up ({split})")
    print(f"wrote {out / 'evaluation.json'} and plots in {out}")
    return results
