"""`romebert quickstart`: the first command a newcomer runs.

Builds the default bundle once (RomeBERT on rotten_tomatoes from the shipped all-MiniLM-L6-v2,
the shipped recipe: 10 to 15 minutes on a 2-core CPU, with progress bars), then serves it. A bundle that
is already there is reused; a run killed half-way resumes from its last saved training state.
Serving replaces this process with a fresh `romebert serve` (exec): the server never holds the
torch and training memory the build needed, and keeps this process's PID for signals.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from romebert.core.bundle import BundleError, load_bundle
from romebert.training.recipes import SHIPPED_METHOD, settings_of

DEFAULT_HOME = Path(os.environ.get("ROMEBERT_HOME", "artifacts"))
# The shipped method as the training benchmark trains it on rotten_tomatoes (training/recipes.py),
# seed 42: about ten minutes on two cores. Two epochs were measured 0.6 point short of 82% dev
# accuracy at full depth (docs/results.md).
DEFAULT_MODEL = dict(method=SHIPPED_METHOD, data="rotten_tomatoes") | settings_of("rotten_tomatoes", SHIPPED_METHOD)


def build_default_bundle(home: Path) -> Path:
    from romebert.model_export.export import export_bundle
    from romebert.model_export.optimize import AUTO
    from romebert.training.train import TrainConfig, train

    bundle, checkpoint = home / "default-bundle", home / "default-checkpoint"
    try:
        load_bundle(bundle)
        print(f"reusing the default bundle at {bundle}")
        return bundle
    except BundleError:
        pass
    if not (checkpoint / "model.safetensors").is_file():
        print(f"training the default model: {DEFAULT_MODEL} on all-MiniLM-L6-v2 (the shipped recipe) ...")
        train(TrainConfig(output=str(checkpoint), save_every=50, resume=True, force=True, **DEFAULT_MODEL))
    print("exporting the default bundle ...")
    return export_bundle(checkpoint, bundle, precision=AUTO, force=bundle.exists())


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="romebert quickstart", description=__doc__)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="where the default checkpoint and bundle live")
    parser.add_argument("--build-only", action="store_true", help="build the bundle, do not serve")
    args, serve_args = parser.parse_known_args(argv)
    bundle = build_default_bundle(args.home)
    if args.build_only:
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "romebert.cli", "serve", str(bundle), *serve_args])
