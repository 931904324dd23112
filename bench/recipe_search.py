"""Recipe search for RomeBERT on rotten_tomatoes, judged on DEV only (test is never read here).

Each run trains one recipe (seed 42, max length 64, batch 32), then keeps the logits of every
exit on the dev split, so that exit rules (entropy, per-exit temperature calibration, patience)
can be compared on the same runs afterwards without retraining. A rerun skips the runs it already
has (their dev logits are on disk), so a cut-off search resumes where it stopped.

    .venv/bin/python bench/recipe_search.py                  # every run below (about 1.5 h on 2 cores)
    .venv/bin/python bench/recipe_search.py --runs rb_base   # some of them

Writes bench/results/recipe_search.json (dev numbers of every run) and keeps each run's dev
logits in artifacts/search/<run>/dev_logits.npz (not committed).
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
from romebert.training.train import TrainConfig, encode_split, train  # noqa: E402
from romebert.core.exits import sweep  # noqa: E402
from romebert.core.tokenization import TextEncoder  # noqa: E402
from romebert.core.data import load_task  # noqa: E402

BASE = dict(data="rotten_tomatoes", max_length=64, batch_size=32, seed=42, device="cpu", save_every=100)
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
}


def run(name: str, out: Path) -> dict:
    folder = out / name
    logits_file = folder / "dev_logits.npz"
    if not logits_file.is_file():
        overrides = dict(RUNS[name])
        if overrides.get("init_from", "").startswith("@"):
            overrides["init_from"] = str(out / overrides["init_from"][1:] / "checkpoint")
        cfg = TrainConfig(output=str(folder / "checkpoint"), resume=True, **(BASE | overrides))
        print(f"=== {name}: {cfg}", flush=True)
        ckpt = train(cfg)
        task = load_task(BASE["data"], seed=BASE["seed"])
        encoded, labels = encode_split(TextEncoder(ckpt / "tokenizer.json", BASE["max_length"]), task.dev)
        logits = exit_logits(MultiExitBert.from_checkpoint(ckpt), encoded, 256)
        np.savez(logits_file, logits=logits, labels=labels)
    data = np.load(logits_file)
    logits, labels = data["logits"], data["labels"]
    record = json.loads((folder / "checkpoint" / "training_record.json").read_text())
    return {
        "overrides": RUNS[name],
        "train_seconds": round(record["train_seconds"], 1),
        "dev_acc_per_exit": [float((z.argmax(-1) == labels).mean()) for z in logits],
        "dev_sweep": sweep(logits, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated names from RUNS")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "search")
    args = parser.parse_args()
    results_file = ROOT / "bench" / "results" / "recipe_search.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"settings": BASE, "runs": {}}
    for name in args.runs.split(","):
        results["runs"][name] = run(name, args.out)
        write_json(results_file, results)
        accs = " ".join(f"{100 * a:.1f}" for a in results["runs"][name]["dev_acc_per_exit"])
        print(f"--- {name}: dev acc per exit {accs}", flush=True)


if __name__ == "__main__":
    main()
