"""How accuracy trades against depth: each exit forced, and the entropy-threshold sweep.

Exit selection goes through core.exits, the very rule the server applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from romebert.core.exits import THRESHOLD_GRID, sweep
from romebert.core.tokenization import Encoded, LengthBatches, TextEncoder
from romebert.training.intervals import correct_at, interval, paired_difference


@torch.no_grad()
def exit_logits(model, encoded: Encoded, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Logits of every exit for every row, (L, N, C), in split order."""
    model.eval()
    split = LengthBatches.of(encoded, batch_size)

    def logits(batch: Encoded) -> np.ndarray:
        inputs = (torch.from_numpy(a).to(device) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids))
        return model(*inputs).float().cpu().numpy()

    return split.in_split_order(logits(b) for b in split.batches)


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


def report_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Per-exit metrics and the threshold sweep, each accuracy with its 95% bootstrap interval."""
    per_exit = per_exit_metrics(logits, labels)
    for row, z in zip(per_exit, logits):
        ci = interval(z.argmax(-1) == labels)
        row |= {"lo": ci["lo"], "hi": ci["hi"]}
    rows = sweep(logits, labels)
    for row in rows:
        ci = interval(correct_at(logits, labels, row["threshold"])[0])
        row |= {"lo": ci["lo"], "hi": ci["hi"]}
    return {"per_exit": per_exit, "sweep": rows, "num_layers": int(logits.shape[0])}


def paired_report(logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray) -> dict:
    """a minus b on the same examples: at full depth, at every exit, and at every threshold of the grid."""
    full = paired_difference(logits_a[-1].argmax(-1) == labels, logits_b[-1].argmax(-1) == labels)
    exits = [paired_difference(za.argmax(-1) == labels, zb.argmax(-1) == labels) for za, zb in zip(logits_a, logits_b)] \
        if logits_a.shape[0] == logits_b.shape[0] else []
    thresholds = [{"threshold": t} | paired_difference(correct_at(logits_a, labels, t)[0], correct_at(logits_b, labels, t)[0])
                  for t in THRESHOLD_GRID]
    return {"full_depth": full, "per_exit": exits, "sweep": thresholds}


def _ci(row: dict) -> str:
    return f"{100 * row['accuracy']:5.1f} [{100 * row['lo']:4.1f}, {100 * row['hi']:4.1f}]"


def format_report(name: str, report: dict) -> str:
    lines = [f"== {name}", "exit  accuracy [95% interval]"]
    lines += [f"{r['exit']:>4}  {_ci(r)}" for r in report["per_exit"]]
    lines.append(f"{'threshold':>9}  {'accuracy [95% interval]':<24} {'avg layer':>9} {'speed-up':>9}")
    for r in report["sweep"]:
        lines.append(f"{r['threshold']:9.3f}  {_ci(r):<24} {r['avg_exit_layer']:9.2f} {r['speedup']:8.2f}x")
    return "\n".join(lines)


def format_paired(a: str, b: str, paired: dict) -> str:
    d = paired["full_depth"]
    lines = [f"== {a} minus {b}, same examples (paired 95% interval)",
             f"full depth {100 * d['difference']:+5.1f} [{100 * d['lo']:+4.1f}, {100 * d['hi']:+4.1f}]"]
    for r in paired["sweep"]:
        lines.append(f"threshold {r['threshold']:5.3f}  {100 * r['difference']:+5.1f} [{100 * r['lo']:+4.1f}, {100 * r['hi']:+4.1f}]")
    return "\n".join(lines)


def evaluate_checkpoints(
    checkpoints: list[Path], data: str | None, split: str, out: Path, batch_size: int = 128, limit: int | None = None
) -> dict:
    """Evaluate checkpoints side by side; print tables, write evaluation.json and two plots."""
    from romebert.training.checkpoint import read_record, split_seed, task_of
    from romebert.core.data import encode_examples
    from romebert.core.files import write_json
    from romebert.training.model import MultiExitBert
    from romebert.training.plots import plot_per_exit, plot_speedup

    results: dict = {}
    logits_of: dict = {}
    # every folder is checked (a checkpoint, its data known) before minutes go into the first one
    loaded = [(ckpt, MultiExitBert.from_checkpoint(ckpt), read_record(ckpt)) for ckpt in map(Path, checkpoints)]
    tasks = [task_of(ckpt, record, data, limit) for ckpt, _, record in loaded]
    for (ckpt, model, record), task in zip(loaded, tasks):
        encoder = TextEncoder(ckpt / "tokenizer.json", getattr(model.config, "max_seq_length", 128))
        examples = getattr(task, split)
        encoded, labels = encode_examples(encoder, examples)
        logits = exit_logits(model, encoded, batch_size)
        report = report_from_logits(logits, labels)
        report.update({"checkpoint": str(ckpt), "method": record.get("method", ckpt.name), "data": task.name, "split": split, "size": len(labels)})
        name = report["method"] if report["method"] not in results else ckpt.name
        results[name] = report
        logits_of[name] = (logits, labels, examples, split_seed(record))
        print(format_report(f"{name} ({task.name} {split}, n={len(labels)})", report))
    names = list(results)
    for other in names[1:]:  # paired with the first checkpoint, when both were read on the same examples
        (za, ya, ea, seed_a), (zb, _, eb, seed_b) = logits_of[other], logits_of[names[0]]
        if ea == eb:
            results[other]["paired_with_" + names[0]] = paired = paired_report(za, zb, ya)
            print(format_paired(other, names[0], paired))
        else:
            why = f"their runs' seeds ({seed_a}, {seed_b}) split the data differently" if seed_a != seed_b else "their data differ"
            print(f"== {other} and {names[0]} are not compared pairwise: {why}, so their {split} rows are not the same examples (train with one --seed to compare them row by row)")
    out = Path(out)
    write_json(out / "evaluation.json", results)
    num_layers = next(iter(results.values()))["num_layers"]
    curves = {k: {key: [r[key] for r in v["per_exit"]] for key in ("accuracy", "lo", "hi")} for k, v in results.items()}
    plot_per_exit(curves, out / "per_exit_accuracy.png", f"accuracy per exit ({split}, 95% intervals)")
    plot_speedup({k: v["sweep"] for k, v in results.items()}, num_layers, out / "accuracy_vs_speedup.png", f"accuracy vs speed-up ({split}, 95% intervals)")
    print(f"wrote {out / 'evaluation.json'} and plots in {out}")
    return results
