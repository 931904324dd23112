"""Recipe search for RomeBERT, judged on DEV only (test is never read here).

rotten_tomatoes (seed 42, max length 64, batch 32) and IMDB (seed 1, bench/train.py's IMDB
settings: 128 tokens, 600 training reviews, 1,000 dev, 2 epochs, batch 16). Each run trains one
recipe, then keeps the logits of every exit on the dev split, so that exit rules (entropy,
per-exit temperature calibration, patience) can be compared on the same runs afterwards without
retraining. A rerun skips the runs it already has (their dev logits are on disk, from a checkpoint
trained with the run's settings as they read today), so a cut-off search resumes where it stopped.

    .venv/bin/python bench/recipe_search.py                  # rotten_tomatoes, every run (about 3 h on 2 cores)
    .venv/bin/python bench/recipe_search.py --runs rb_base   # some of them
    .venv/bin/python bench/recipe_search.py --data imdb      # IMDB's runs (about 85 min)
    .venv/bin/python bench/recipe_search.py --runs rb_grswap_bf16 --seeds 1,2,3   # on the benchmark's seeds

One seed is a weak screen: its differences under about 2 points sit inside their intervals, and
the search's seed can be one where the shipped recipe has no weakness to fix. `--seeds` trains the
named runs on bench/train.py's splits of those seeds instead and compares each, on dev and paired,
with the benchmark's own shipped-recipe run of the same seed (trained first, into the benchmark's
folder, when the benchmark has none for that seed).

Writes bench/results/recipe_search.json (rotten_tomatoes) or recipe_search_imdb.json (dev
numbers of every run) and keeps each run's dev logits in artifacts/search[_imdb]/<run>/dev_logits.npz
(not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebert.training.evaluate import exit_logits  # noqa: E402
from romebert.core.files import write_json  # noqa: E402
from romebert.training.model import MultiExitBert  # noqa: E402
from romebert.training.checkpoint import read_record  # noqa: E402
from romebert.training.train import TrainConfig, resolve_precision, task_data, trained_precision  # noqa: E402
from romebert.core.exits import sweep  # noqa: E402
from romebert.training.intervals import correct_at, paired_difference, threshold_for_speedup  # noqa: E402
from bench.harness import environment, kept, trained  # noqa: E402
from romebert.training.recipes import SHIPPED_METHOD, DATASETS, settings_of  # noqa: E402
from bench.exit_rules import at_speedup, calibrated_curve, entropy_curve, patience_curve  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.core.data import encode_examples  # noqa: E402

# What rounds 1-2 ran with where today's TrainConfig defaults differ, so that a rerun reproduces
# them: fp32 (before `auto` chose bf16 on a CPU with AMX) and the "batchmean" KL reduction (before
# round 1 made the reference's "mean" the default).
BASE = dict(data="rotten_tomatoes", max_length=64, batch_size=32, seed=42, device="cpu", save_every=100,
            precision="fp32", kl_reduction="batchmean")
# name -> TrainConfig overrides; "@name" in init_from is that run's checkpoint (it runs first).
RUNS: dict[str, dict] = {
    "finetune": dict(method="finetune", lr=1e-4, epochs=3),
    "deebert": dict(method="deebert", lr=1e-4, epochs=3),
    "rb_base": dict(method="romebert", lr=1e-4, epochs=3),
    "rb_ft_lr2e-5_1ep": dict(method="romebert", lr=2e-5, epochs=1, init_from="@finetune"),
    "rb_ft_lr5e-5_1ep": dict(method="romebert", lr=5e-5, epochs=1, init_from="@finetune"),
    "rb_ft_lr1e-4_1ep": dict(method="romebert", lr=1e-4, epochs=1, init_from="@finetune"),
    "rb_ft_lr2e-5_2ep": dict(method="romebert", lr=2e-5, epochs=2, init_from="@finetune"),
    "rb_ft_nogr_lr5e-5_1ep": dict(method="romebert", lr=5e-5, epochs=1, init_from="@finetune", gradient_regularization=False),
    "rb_lr2e-5": dict(method="romebert", lr=2e-5, epochs=3),
    "rb_lr5e-5": dict(method="romebert", lr=5e-5, epochs=3),
    "rb_gamma0.5": dict(method="romebert", lr=1e-4, epochs=3, gamma=0.5),
    "rb_T1": dict(method="romebert", lr=1e-4, epochs=3, temperature=1.0),
    "rb_klmean": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean"),
    "rb_nogr": dict(method="romebert", lr=1e-4, epochs=3, gradient_regularization=False),
    "rb_grswap": dict(method="romebert", lr=1e-4, epochs=3, gr_swap=True),
    "rb_warmup0.1": dict(method="romebert", lr=1e-4, epochs=3, warmup_ratio=0.1),
    # round 2, around the best of round 1 (the reference's KL reduction: half the distillation weight)
    "rb_klmean_gamma0.5": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", gamma=0.5),
    "rb_klmean_nogr": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", gradient_regularization=False),
    # round 3, in bf16 (how the benchmark trains on a CPU with AMX), where its seeds had the shipped
    # recipe short of fine-tuning's target at 2x (docs/results.md): do more epochs lift it, as on IMDB?
    "deebert_bf16": dict(method="deebert", lr=1e-4, epochs=3, precision="bf16", kl_reduction="mean"),  # as it ran (DeeBERT has no KL)
    "rb_bf16": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", precision="bf16"),
    "rb_4ep_bf16": dict(method="romebert", lr=1e-4, epochs=4, kl_reduction="mean", precision="bf16"),
    "rb_5ep_bf16": dict(method="romebert", lr=1e-4, epochs=5, kl_reduction="mean", precision="bf16"),
    # round 4, in bf16: the benchmark's five seeds put the shipped recipe's final exit 1.0 point
    # under fine-tuning on rotten_tomatoes. Two ways to shield it, never tried with the shipped KL
    # reduction: GR swapped (the exits' gradient loses what conflicts with the final exit's, not
    # the other way round) and gradient equilibrium (each early exit's pull on the backbone
    # scaled by 1/(L-1-i)).
    "rb_grswap_bf16": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", precision="bf16", gr_swap=True),
    "rb_ge_bf16": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", precision="bf16", gradient_equilibrium=True),
    # and fewer passes, the other side of round 3's 4 and 5 epochs
    "rb_2ep_bf16": dict(method="romebert", lr=1e-4, epochs=2, kl_reduction="mean", precision="bf16"),
    # round 5, in bf16: a third way to shield the final exit, a smaller weight on the early exits'
    # losses against its CE (the step from "batchmean" to "mean", half the distillation, was the
    # largest gain of round 1)
    "rb_w0.5_bf16": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", precision="bf16", exit_weight=0.5),
    "rb_w0.25_bf16": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", precision="bf16", exit_weight=0.25),
    # round 6, in fp32 (the AMD machine's benchmark runs): round 5's better weight, screened on the
    # benchmark's splits, where the shipped recipe's final exit trails fine-tuning on dev (seed 42's does not)
    "rb_w0.25": dict(method="romebert", lr=1e-4, epochs=3, kl_reduction="mean", exit_weight=0.25),
}

# IMDB: the training benchmark's settings (its seed-1 split), the shipped recipe's defaults; each
# run names only what it changes. Why these: with 600 reviews the shipped recipe's final exit
# trails fine-tuning by 1.8 points (docs/results.md), so the search asks whether more steps, a
# larger or smaller lr, less distillation, no GR, or starting from fine-tuning keeps it.
IMDB_BASE = dict(data="imdb", seed=1, device="cpu", save_every=50, precision="fp32") | DATASETS["imdb"]
IMDB_RUNS: dict[str, dict] = {
    "finetune": dict(method="finetune"),
    "finetune_4ep": dict(method="finetune", epochs=4),
    "deebert": dict(method="deebert"),
    "deebert_4ep": dict(method="deebert", epochs=4),
    "rb": dict(method="romebert"),
    "rb_3ep": dict(method="romebert", epochs=3),
    "rb_4ep": dict(method="romebert", epochs=4),
    "rb_6ep": dict(method="romebert", epochs=6),
    "rb_lr2e-4": dict(method="romebert", lr=2e-4),
    "rb_lr5e-5_4ep": dict(method="romebert", lr=5e-5, epochs=4),
    "rb_gamma0.5": dict(method="romebert", gamma=0.5),
    "rb_nogr": dict(method="romebert", gradient_regularization=False),
    "rb_ft_lr2e-5": dict(method="romebert", lr=2e-5, init_from="@finetune"),
    "rb_ft_lr5e-5": dict(method="romebert", lr=5e-5, init_from="@finetune"),
    # after the benchmark's five seeds (bf16) left the 6-epoch recipe 0.1 short of fine-tuning - 0.5
    # at 2x on test: do more passes still lift it? Screened with --seeds against the benchmark's runs.
    "rb_8ep_bf16": dict(method="romebert", epochs=8, precision="bf16"),
    # rotten_tomatoes' confirmed exit weight (round 6), tested once on the benchmark's seeds 1-5
    "rb_6ep_w0.25": dict(method="romebert", epochs=6, exit_weight=0.25),
}
# dataset -> (settings every run shares, runs, results file, the runs that are the shipped recipe:
# one per precision, each RomeBERT run compared with the one of its own precision)
SEARCHES = {
    "rotten_tomatoes": (BASE, RUNS, ROOT / "bench" / "results" / "recipe_search.json", ["rb_klmean", "rb_bf16"]),
    "imdb": (IMDB_BASE, IMDB_RUNS, ROOT / "bench" / "results" / "recipe_search_imdb.json", ["rb"]),
}


def run(name: str, out: Path, base: dict, runs: dict[str, dict]) -> dict:
    folder = out / name
    logits_file = folder / "dev_logits.npz"
    overrides = dict(runs[name])
    if overrides.get("init_from", "").startswith("@"):
        overrides["init_from"] = str(out / overrides["init_from"][1:] / "checkpoint")
    cfg = TrainConfig(output=str(folder / "checkpoint"), resume=True, **(base | overrides))
    if not kept(logits_file, cfg):
        print(f"=== {name}: {cfg}", flush=True)
        ckpt = trained(cfg)
        encoded, labels = encode_examples(TextEncoder(ckpt / "tokenizer.json", cfg.max_length), task_data(cfg).dev)
        logits = exit_logits(MultiExitBert.from_checkpoint(ckpt), encoded, 256)
        np.savez(logits_file, logits=logits, labels=labels)
        write_json(folder / "environment.json", environment())
    data = np.load(logits_file)
    logits, labels = data["logits"], data["labels"]
    record = read_record(folder / "checkpoint")
    return {
        "overrides": runs[name],
        "train_seconds": round(record["train_seconds"], 1),
        "precision": trained_precision(record),
        # where this run trained; the file's top-level `environment` is that of the runs from before this field
        "environment": json.loads((folder / "environment.json").read_text()) if (folder / "environment.json").is_file() else None,
        "dev_acc_per_exit": [float((z.argmax(-1) == labels).mean()) for z in logits],
        "dev_sweep": sweep(logits, labels),
    }


def reference(name: str, runs: dict[str, dict], loaded: dict, candidates: list[str]) -> str | None:
    """The run of `candidates` a run is compared with: the first trained in the same precision (a
    bf16 run against an fp32 reference would mix the two effects); None for the reference itself."""
    precision = runs[name].get("precision")
    ref = next((n for n in candidates if n in loaded and runs[n].get("precision") == precision), None)
    return None if ref == name else ref


def correct_pairs(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per point (full depth, >= 2x, >= 3x): which dev rows a run and its reference get right, each
    at its own least aggressive threshold reaching the speed-up; a point either cannot reach is left out."""
    pairs = {"full_depth": (logits[-1].argmax(-1) == labels, ref_logits[-1].argmax(-1) == labels)}
    for s in (2, 3):
        t, t_ref = threshold_for_speedup(logits, s), threshold_for_speedup(ref_logits, s)
        if t is not None and t_ref is not None:
            pairs[f"at_{s}x"] = (correct_at(logits, labels, t)[0], correct_at(ref_logits, labels, t_ref)[0])
    return pairs


def report(names: list[str], out: Path, runs: dict[str, dict], shipped: list[str]) -> dict:
    """Per run: dev accuracy at full depth and at >= 2x / >= 3x speed-up; the paired dev difference
    to DeeBERT at those points, and to the shipped recipe at those and at full depth (when their
    logits are there); for every run, the three exit rules side by side. Only runs whose dev
    logits are on disk."""
    loaded = {n: np.load(out / n / "dev_logits.npz") for n in names if (out / n / "dev_logits.npz").is_file()}
    deeberts = [n for n, o in runs.items() if o["method"] == "deebert"]
    rows = {}
    for name, data in loaded.items():
        logits, labels = data["logits"], data["labels"]
        row = {"full_depth": float((logits[-1].argmax(-1) == labels).mean())}
        for s in (2, 3):
            row[f"at_{s}x"] = at_speedup(entropy_curve(logits, labels), s)
            for rule, curve in (("patience", patience_curve(logits, labels)), ("calibrated", calibrated_curve(logits, labels))):
                row[f"{rule}_at_{s}x"] = at_speedup(curve, s)
        if ref := reference(name, runs, loaded, deeberts):
            for point, pair in correct_pairs(logits, loaded[ref]["logits"], labels).items():
                if point != "full_depth":
                    row[f"minus_deebert_{point}"] = paired_difference(*pair)
        if runs[name]["method"] == "romebert" and (ref := reference(name, runs, loaded, shipped)):
            pairs = correct_pairs(logits, loaded[ref]["logits"], labels)
            row["minus_shipped"] = {"reference": ref} | {point: paired_difference(*pair) for point, pair in pairs.items()}
        rows[name] = row
    return rows


def on_seeds(names: list[str], seeds: list[int], data: str, out: Path, base: dict, runs: dict[str, dict], shipped: list[str]) -> dict:
    """Each run on the benchmark's split of each seed, against the benchmark's shipped-recipe run of
    that seed on the same dev rows: per seed, and pooled (every seed's rows together, as bench/train.py);
    pooled once more with the search's own seed where the run and its shipped reference are there."""
    import torch

    from bench.train import run as benchmark_run

    results = {}
    for name in names:
        per_seed, pooled_pairs = {}, {}
        for seed in seeds:
            # bench/train.py's own function: it trains the run when the benchmark has none for this
            # seed (a fresh split), where bench/train.py will find it later.
            ref = benchmark_run(data, SHIPPED_METHOD, seed)
            seeded, settings = f"{name}@seed{seed}", base | settings_of(data, SHIPPED_METHOD) | {"seed": seed}
            asked = settings | runs[name]
            precision = resolve_precision(asked.get("precision", "auto"), torch.device(asked["device"]))
            if precision != ref["precision"]:
                raise SystemExit(f"{seeded} would train in {precision}, the benchmark's seed {seed} trained in {ref['precision']}")
            entry = run(seeded, out, settings, {seeded: runs[name]})
            mine = np.load(out / seeded / "dev_logits.npz")
            assert (mine["labels"] == ref["dev_labels"]).all(), "not the benchmark's dev split"
            pairs = correct_pairs(mine["logits"], ref["dev_logits"], mine["labels"])
            per_seed[str(seed)] = entry | {"minus_shipped": {point: paired_difference(*pair) for point, pair in pairs.items()}}
            pooled_pairs[seed] = pairs
        results[name] = {"seeds": per_seed, "pooled_minus_shipped": pooled(pooled_pairs.values())}
        loaded = {n: np.load(out / n / "dev_logits.npz") for n in [name, *shipped] if (out / n / "dev_logits.npz").is_file()}
        if name in loaded and (ref_name := reference(name, runs, loaded, shipped)):
            own = correct_pairs(loaded[name]["logits"], loaded[ref_name]["logits"], loaded[name]["labels"])
            results[name]["search_seed"] = {point: paired_difference(*pair) for point, pair in own.items()}
            results[name]["pooled_with_search_seed"] = pooled([*pooled_pairs.values(), own])
        for key in ("pooled_minus_shipped", "pooled_with_search_seed"):
            if key in results[name]:
                print(f"--- {name}, dev, {key}: " + ", ".join(f"{k} {shown(d)}" for k, d in results[name][key].items()), flush=True)
    return results


def shown(d: dict | None) -> str:
    """A paired difference as the tables print it: +0.3 [-0.3, +0.9] (points)."""
    return "" if d is None else f"{100 * d['difference']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def pooled(splits) -> dict:
    """Paired differences with every split's rows together (each (split, row) one pair), per point
    that every split reached."""
    splits = list(splits)
    points = [p for p in splits[0] if all(p in pairs for pairs in splits)]
    return {p: paired_difference(np.concatenate([pairs[p][0] for pairs in splits]), np.concatenate([pairs[p][1] for pairs in splits]))
            for p in points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=SEARCHES, default="rotten_tomatoes")
    parser.add_argument("--runs", help="comma-separated names from RUNS (IMDB_RUNS with --data imdb); default all")
    parser.add_argument("--out", type=Path, help="default artifacts/search (rotten_tomatoes), artifacts/search_imdb")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the runs already there")
    parser.add_argument("--seeds", help="comma-separated: the named runs on the training benchmark's splits of these seeds, "
                                        "against its shipped-recipe runs (see above)")
    args = parser.parse_args()
    base, runs, results_file, shipped = SEARCHES[args.data]
    out = args.out or ROOT / "artifacts" / ("search" if args.data == "rotten_tomatoes" else f"search_{args.data}")
    results = (json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}) | {"settings": base}
    names = args.runs.split(",") if args.runs else list(runs)
    if unknown := [n for n in names if n not in runs]:
        parser.error(f"unknown runs for {args.data}: {', '.join(unknown)}; known: {', '.join(runs)}")
    if args.seeds:
        # one entry per run and seed list, so that a confirmation on fresh seeds keeps the screen it confirms
        seeds = [int(s) for s in args.seeds.split(",")]
        results["on_benchmark_seeds"] = results.get("on_benchmark_seeds", {}) | {
            f"{name}@seeds{','.join(map(str, seeds))}": entry for name, entry in on_seeds(names, seeds, args.data, out, base, runs, shipped).items()}
        write_json(results_file, results)
        return
    for name in names if not args.report_only else []:
        results["runs"][name] = run(name, out, base, runs)
        write_json(results_file, results)
        accs = " ".join(f"{100 * a:.1f}" for a in results["runs"][name]["dev_acc_per_exit"])
        print(f"--- {name}: dev acc per exit {accs}", flush=True)
    # Rows of runs whose logits are gone (another machine) stay as they were reported.
    fresh, old = report([n for n in runs if n in results["runs"]], out, runs, shipped), results.get("report", {})
    results["report"] = {n: fresh.get(n, old.get(n)) for n in runs if n in fresh or n in old}
    write_json(results_file, results)
    pct = lambda v: "   -" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    print(f"{'run':<24}{'full':>6}{'@2x':>6}{'@3x':>6}  {'vs DeeBERT @2x [95%]':<22}{'vs shipped @2x [95%]':<22}"
          f"{'patience @2x/@3x':>18}{'calibrated @2x/@3x':>20}")
    for name, r in results["report"].items():
        print(f"{name:<24}{pct(r['full_depth'])}{pct(r['at_2x'])}{pct(r['at_3x'])}  {shown(r.get('minus_deebert_at_2x')):<22}"
              f"{shown(r.get('minus_shipped', {}).get('at_2x')):<22}"
              f"{pct(r['patience_at_2x'])}/{pct(r['patience_at_3x']):<11}{pct(r['calibrated_at_2x'])}/{pct(r['calibrated_at_3x'])}")


if __name__ == "__main__":
    main()
