"""Training benchmark: fine-tuning vs DeeBERT vs the shipped RomeBERT recipe, several seeds, two datasets.

all-MiniLM-L6-v2; rotten_tomatoes (short snippets) and IMDB (long reviews, where a layer costs
more and an early exit saves most), settings in training/recipes.py. Every method runs with every seed in
SEEDS; seed s fixes the data split and the initialisation alike, so the methods of one seed
compare on the same examples (paired). Thresholds are chosen on DEV; TEST is read once per run,
for the report:

- accuracy at each exit forced (test), mean and spread over seeds;
- at >= 2x and >= 3x speed-up: the least aggressive threshold reaching the speed-up on dev, then
  its test accuracy (and the test speed-up it gave);
- the largest dev speed-up whose dev accuracy is within 0.5 point of the same seed's fine-tuning
  at full depth, then its test accuracy and test speed-up;
- paired test differences (shipped recipe minus DeeBERT) at those points, with 95% intervals.

Each run keeps its dev and test logits (artifacts/bench/train/<dataset>/<method>/seed<s>/), so a
rerun skips the runs it already has (unless they were trained with other settings than today's:
those train again), a run cut off mid-training resumes from its last saved state, and one cut off
after training, while its logits were computed, is not trained again. Writes
bench/results/train.json and docs/{per_exit_accuracy,accuracy_vs_speedup}_<dataset>.png.

    .venv/bin/python bench/train.py        # both datasets; its time on each CPU measured: docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exit_rules import at_speedup, calibrated_curve, entropy_curve, patience_curve  # noqa: E402
from bench.harness import environment, kept, trained  # noqa: E402
from romebert.core.data import encode_examples  # noqa: E402
from romebert.core.exits import THRESHOLD_GRID  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.training.evaluate import exit_logits  # noqa: E402
from romebert.training.intervals import correct_at, fine_grid, interval, paired_difference, threshold_for_speedup  # noqa: E402
from romebert.training.model import MultiExitBert  # noqa: E402
from romebert.training.plots import plot_per_exit, plot_speedup  # noqa: E402
from romebert.training.recipes import SHIPPED_METHOD, DATASETS, METHOD_SETTINGS, settings_of  # noqa: E402
from romebert.training.checkpoint import read_record  # noqa: E402
from romebert.training.train import TrainConfig, task_data, trained_precision  # noqa: E402

SEEDS = (1, 2, 3)
METHODS = ("finetune", "deebert", SHIPPED_METHOD)
SPEEDUPS = (2, 3)
# Which thresholds the operating points are read at (training/intervals.fine_grid); a summary
# without this name in its settings was read on the even grid alone.
THRESHOLD_GRID_NAME = "paper + 200 even + 1,000 dev-entropy quantiles"
# How a threshold is picked on that grid (intervals.threshold_for_speedup); a summary without this
# name in its settings took the best dev accuracy among the thresholds reaching the speed-up.
OPERATING_POINT_RULE = "least aggressive threshold reaching the speed-up on dev"
OUT = ROOT / "artifacts" / "bench" / "train"


def run(dataset: str, method: str, seed: int) -> dict:
    """Train (or reuse) one run; its dev and test logits, labels and training time."""
    folder = OUT / dataset / method / f"seed{seed}"
    logits_file = folder / "logits.npz"
    cfg = TrainConfig(method=method, data=dataset, output=str(folder / "checkpoint"), seed=seed, device="cpu", save_every=50,
                      resume=True, **settings_of(dataset, method))
    if not kept(logits_file, cfg):
        print(f"=== {dataset} {method} seed {seed}", flush=True)
        checkpoint = trained(cfg)
        task = task_data(cfg)
        encoder = TextEncoder(checkpoint / "tokenizer.json", cfg.max_length)
        model = MultiExitBert.from_checkpoint(checkpoint)
        arrays = {}
        for split, examples in (("dev", task.dev), ("test", task.test)):
            encoded, labels = encode_examples(encoder, examples)
            arrays[f"{split}_logits"], arrays[f"{split}_labels"] = exit_logits(model, encoded, 64), labels
        np.savez(logits_file, **arrays)
    data = dict(np.load(logits_file))
    record = read_record(folder / "checkpoint")
    data["train_seconds"] = record["train_seconds"]
    data["precision"] = trained_precision(record)
    return data


def full_depth_correct(r: dict, split: str = "test") -> np.ndarray:
    """Correct per example of a split at the final exit."""
    return r[f"{split}_logits"][-1].argmax(-1) == r[f"{split}_labels"]


def at_threshold(r: dict, split: str, t: float) -> tuple[np.ndarray, float]:
    """(correct per example, speed-up) of a run on a split at threshold t."""
    logits = r[f"{split}_logits"]
    correct, avg = correct_at(logits, r[f"{split}_labels"], t)
    return correct, logits.shape[0] / avg


def within_half_point(r: dict, finetune_dev_acc: float) -> float:
    """On dev: the largest-speed-up threshold whose accuracy is within 0.5 point of fine-tuning."""
    best = 0.0
    for t in fine_grid(r["dev_logits"]):
        correct, speedup = at_threshold(r, "dev", t)
        if correct.mean() >= finetune_dev_acc - 0.005 and speedup >= at_threshold(r, "dev", best)[1]:
            best = float(t)
    return best


def spread(values: np.ndarray | list[float], axis: int | None = None) -> np.ndarray | float:
    """Sample standard deviation over seeds; NaN from one seed (no spread to show), without numpy's warning."""
    values = np.asarray(values)
    if values.shape[axis or 0] < 2:
        return np.full(np.delete(values.shape, axis or 0), np.nan) if axis is not None else np.nan
    return values.std(axis=axis, ddof=1)


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(spread(values))}


def with_pooled(pairs: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Paired differences (a - b) per seed, and pooled: every seed's test examples together, each
    (seed, example) a pair, so the interval narrows with seeds (it resamples examples, not seeds)."""
    per_seed = [{"seed": seed} | paired_difference(a, b, seed) for seed, (a, b) in pairs.items()]
    if not pairs:
        return {"per_seed": per_seed, "pooled": None}
    pooled = paired_difference(np.concatenate([a for a, _ in pairs.values()]), np.concatenate([b for _, b in pairs.values()]))
    return {"per_seed": per_seed, "pooled": pooled}


def exit_rules_on_dev(by_seed: dict[int, dict]) -> dict:
    """The shipped recipe's dev accuracy at >= 2x and >= 3x under each exit rule (bench/exit_rules.py),
    per seed: the server's rule is chosen here, on every seed, not on the recipe search's one."""
    rules = {"entropy": entropy_curve, "calibrated": calibrated_curve, "patience": patience_curve}
    per_seed = {str(seed): {rule: {str(s): at_speedup(curve(r["dev_logits"], r["dev_labels"]), s) for s in SPEEDUPS}
                            for rule, curve in rules.items()} for seed, r in by_seed.items()}
    return {"per_seed": per_seed, "mean": {rule: {str(s): None if None in (v := [p[rule][str(s)] for p in per_seed.values()]) else float(np.mean(v))
                                                  for s in SPEEDUPS} for rule in rules}}


def summarize(dataset: str, runs: dict[str, dict[int, dict]]) -> dict:
    precisions = sorted({str(r["precision"]) for by_seed in runs.values() for r in by_seed.values()})
    if len(precisions) > 1:
        raise SystemExit(f"{dataset}: the runs in {OUT / dataset} were trained in {' and '.join(precisions)}; methods compare only "
                         "in one precision: move the runs of the other aside (training's `auto` picks by the CPU, docs/results.md)")
    methods = {}
    finetune = runs["finetune"]
    for method, by_seed in runs.items():
        per_exit = np.array([[(z.argmax(-1) == r["test_labels"]).mean() for z in r["test_logits"]] for r in by_seed.values()])
        if method == "finetune":
            per_exit = per_exit[:, -1:]  # its early exits are never trained
        entry = {
            "seeds": list(by_seed), "train_seconds_mean": float(np.mean([r["train_seconds"] for r in by_seed.values()])),
            "test_acc_per_exit_mean": per_exit.mean(0).tolist(), "test_acc_per_exit_std": spread(per_exit, axis=0).tolist(),
            "test_acc_full_depth_interval_per_seed": [interval(full_depth_correct(r)) for r in by_seed.values()],
        }
        if method != "finetune":
            entry["acc_at_speedup"], entry["speedup_at_speedup"], entry["threshold_at_speedup"] = {}, {}, {}
            for s in SPEEDUPS:
                points = [(t, *at_threshold(r, "test", t)) for r in by_seed.values() if (t := threshold_for_speedup(r["dev_logits"], s)) is not None]
                entry["threshold_at_speedup"][str(s)] = [p[0] for p in points]
                entry["acc_at_speedup"][str(s)] = mean_std([p[1].mean() for p in points]) if points else None
                entry["speedup_at_speedup"][str(s)] = mean_std([p[2] for p in points]) if points else None
            half = []
            for seed, r in by_seed.items():
                ft_dev = full_depth_correct(finetune[seed], "dev").mean()
                correct, speedup = at_threshold(r, "test", within_half_point(r, ft_dev))
                half.append((correct.mean(), speedup))
            entry["within_half_point_of_finetune"] = {"test_acc": mean_std([h[0] for h in half]), "test_speedup": mean_std([h[1] for h in half])}
            entry["sweep_mean"] = []
            for t in THRESHOLD_GRID:
                points = [at_threshold(r, "test", t) for r in by_seed.values()]
                layers = by_seed[next(iter(by_seed))]["test_logits"].shape[0]
                entry["sweep_mean"].append({"threshold": t, "test_acc": float(np.mean([c.mean() for c, _ in points])),
                                            "test_acc_std": float(spread([c.mean() for c, _ in points])),
                                            "avg_exit_layer": float(np.mean([layers / sp for _, sp in points]))})
        methods[method] = entry
    vs_deebert, vs_finetune = {}, {}
    for s in SPEEDUPS:
        pairs, to_finetune = {}, {}
        for seed in runs[SHIPPED_METHOD]:
            a, b = runs[SHIPPED_METHOD][seed], runs["deebert"][seed]
            ta, tb = threshold_for_speedup(a["dev_logits"], s), threshold_for_speedup(b["dev_logits"], s)
            if ta is None:
                continue
            shipped = at_threshold(a, "test", ta)[0]
            to_finetune[seed] = (shipped, full_depth_correct(finetune[seed]))
            if tb is not None:
                pairs[seed] = (shipped, at_threshold(b, "test", tb)[0])
        vs_deebert[str(s)], vs_finetune[str(s)] = with_pooled(pairs), with_pooled(to_finetune)
    full = with_pooled({seed: (full_depth_correct(r), full_depth_correct(finetune[seed])) for seed, r in runs[SHIPPED_METHOD].items()})
    sizes = {split: int(len(next(iter(runs["finetune"].values()))[f"{split}_labels"])) for split in ("dev", "test")}
    settings = DATASETS[dataset] | {"lr": TrainConfig().lr, "precision": precisions[0], "split_sizes": sizes, "threshold_grid": THRESHOLD_GRID_NAME,
                                    "operating_point": OPERATING_POINT_RULE,
                                    "method_overrides": {m: o for (d, m), o in METHOD_SETTINGS.items() if d == dataset}}
    return {"settings": settings, "methods": methods, "exit_rules_on_dev": exit_rules_on_dev(runs[SHIPPED_METHOD]),
            "paired_test_difference": {f"{SHIPPED_METHOD}_minus_deebert_at_speedup": vs_deebert,
                                       f"{SHIPPED_METHOD}_at_speedup_minus_finetune_full_depth": vs_finetune,
                                       f"{SHIPPED_METHOD}_minus_finetune_full_depth": full}}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pm(mean: float, std: float, show=pct) -> str:
    """mean ± std (in percent by default); the mean alone from one seed (no spread to show)."""
    return show(mean) if np.isnan(std) else f"{show(mean)} ± {show(std)}"


def signed(d: dict | None) -> str:
    return "–" if d is None else f"{100 * d['difference']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def report(dataset: str, summary: dict) -> str:
    """The dataset's tables in Markdown, as docs/results.md shows them."""
    methods, seeds = summary["methods"], len(summary["methods"]["finetune"]["seeds"])
    layers = len(methods[SHIPPED_METHOD]["test_acc_per_exit_mean"])
    lines = [f"{dataset}, test split ({summary['settings']['split_sizes']['test']} examples), {seeds} seeds: accuracy %, mean ± std over seeds",
             "", "| | " + " | ".join(f"exit {i + 1}" for i in range(layers)) + " | full depth, 95% interval per seed |",
             "|---" * (layers + 2) + "|"]
    for name, m in methods.items():
        cells = [pm(a, sd) for a, sd in zip(m["test_acc_per_exit_mean"], m["test_acc_per_exit_std"])]
        cells = ["–"] * (layers - len(cells)) + cells
        per_seed = ", ".join(f"{pct(i['accuracy'])} [{pct(i['lo'])}, {pct(i['hi'])}]" for i in m["test_acc_full_depth_interval_per_seed"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    paired = summary["paired_test_difference"]
    to_deebert, to_finetune = (paired[f"{SHIPPED_METHOD}_{key}"] for key in ("minus_deebert_at_speedup", "at_speedup_minus_finetune_full_depth"))
    lines += ["", f"| figure of merit ({OPERATING_POINT_RULE}) | {SHIPPED_METHOD} | deebert | {SHIPPED_METHOD} − deebert, pooled paired [95%] "
              f"| {SHIPPED_METHOD} − fine-tuning's full depth, pooled paired [95%] |", "|---|---|---|---|---|"]
    for s in SPEEDUPS:
        cells = []
        for name in (SHIPPED_METHOD, "deebert"):
            acc, speed = methods[name]["acc_at_speedup"][str(s)], methods[name]["speedup_at_speedup"][str(s)]
            cells.append("–" if acc is None else f"{pm(acc['mean'], acc['std'])} (test speed-up {speed['mean']:.2f}x)")
        lines.append(f"| test accuracy at ≥ {s}x dev speed-up | {cells[0]} | {cells[1]} | {signed(to_deebert[str(s)]['pooled'])} | {signed(to_finetune[str(s)]['pooled'])} |")
    half = [methods[name]["within_half_point_of_finetune"] for name in (SHIPPED_METHOD, "deebert")]
    lines.append("| largest dev speed-up within 0.5 point of fine-tuning: test speed-up, test accuracy | "
                 + " | ".join(f"{pm(h['test_speedup']['mean'], h['test_speedup']['std'], '{:.2f}x'.format)}, {pct(h['test_acc']['mean'])}" for h in half) + " | | |")
    ft = methods["finetune"]["test_acc_per_exit_mean"][0]
    lines.append(f"| full depth (fine-tuning: {pct(ft)}) | {pct(methods[SHIPPED_METHOD]['test_acc_per_exit_mean'][-1])} | "
                 f"{pct(methods['deebert']['test_acc_per_exit_mean'][-1])} | | {signed(paired[f'{SHIPPED_METHOD}_minus_finetune_full_depth']['pooled'])} |")
    if rules := summary.get("exit_rules_on_dev"):
        show = lambda v: "–" if v is None else pct(v)  # noqa: E731
        lines += ["", f"| {SHIPPED_METHOD}, dev accuracy by exit rule, mean of the seeds (per seed) | ≥ 2x | ≥ 3x |", "|---|---|---|"]
        for rule, mean in rules["mean"].items():
            lines.append(f"| {rule} | " + " | ".join(f"{show(mean[str(s)])} ({', '.join(show(p[rule][str(s)]) for p in rules['per_seed'].values())})"
                                                     for s in SPEEDUPS) + " |")
    return "\n".join(lines)


def plot(dataset: str, summary: dict) -> None:
    methods = summary["methods"]
    curves = {m: {"accuracy": v["test_acc_per_exit_mean"],
                  "lo": list(np.subtract(v["test_acc_per_exit_mean"], v["test_acc_per_exit_std"])),
                  "hi": list(np.add(v["test_acc_per_exit_mean"], v["test_acc_per_exit_std"]))} for m, v in methods.items() if m != "finetune"}
    ft = methods["finetune"]
    references = {"fine-tuning (final exit)": {"accuracy": ft["test_acc_per_exit_mean"][0], "lo": ft["test_acc_per_exit_mean"][0] - ft["test_acc_per_exit_std"][0],
                                               "hi": ft["test_acc_per_exit_mean"][0] + ft["test_acc_per_exit_std"][0]}}
    seeds = len(next(iter(methods.values()))["seeds"])
    plot_per_exit(curves, ROOT / "docs" / f"per_exit_accuracy_{dataset}.png",
                  f"{dataset} test: accuracy per exit (mean ± std over {seeds} seeds)", references)
    sweeps = {m: [{"accuracy": r["test_acc"], "lo": r["test_acc"] - r["test_acc_std"], "hi": r["test_acc"] + r["test_acc_std"],
                   "avg_exit_layer": r["avg_exit_layer"]} for r in v["sweep_mean"]] for m, v in methods.items() if "sweep_mean" in v}
    layers = len(next(iter(curves.values()))["accuracy"])
    sweeps["fine-tuning (full depth)"] = [{"accuracy": references["fine-tuning (final exit)"]["accuracy"], "avg_exit_layer": layers,
                                            "lo": references["fine-tuning (final exit)"]["lo"], "hi": references["fine-tuning (final exit)"]["hi"]}]
    points = {m: [{"speedup": v["speedup_at_speedup"][k]["mean"], "speedup_err": v["speedup_at_speedup"][k]["std"],
                   "accuracy": v["acc_at_speedup"][k]["mean"], "accuracy_err": v["acc_at_speedup"][k]["std"]} for k in v["acc_at_speedup"] if v["acc_at_speedup"][k]]
              for m, v in methods.items() if "acc_at_speedup" in v}
    plot_speedup(sweeps, layers, ROOT / "docs" / f"accuracy_vs_speedup_{dataset}.png",
                 f"{dataset} test: accuracy vs speed-up (mean ± std over {seeds} seeds)", points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--report", action="store_true", help="train nothing: print the tables of bench/results/train.json and redraw its plots")
    args = parser.parse_args()
    results_file = ROOT / "bench" / "results" / "train.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.report:
        for dataset, summary in previous["datasets"].items():
            print(report(dataset, summary), end="\n\n")
            plot(dataset, summary)
        return
    result = {"backbone": "all-MiniLM-L6-v2", "shipped": SHIPPED_METHOD, "seeds_planned": [int(s) for s in args.seeds.split(",")],
              "datasets": previous.get("datasets", {}) if "shipped" in previous else {}, "environment": environment()}
    for dataset in args.datasets.split(","):
        runs: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
        for seed in map(int, args.seeds.split(",")):  # seed by seed, so that a cut-off benchmark still reports whole, paired seeds
            for m in METHODS:
                runs[m][seed] = run(dataset, m, seed)
            # Each dataset records what it ran on: a rerun of one dataset leaves the other's as it was.
            result["datasets"][dataset] = summary = summarize(dataset, runs) | {"environment": environment()}
            write_json(results_file, result)
            plot(dataset, summary)
        print(report(dataset, summary), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
