"""The default model bundle that `romebert quickstart` (quickstart.py at the top) builds once and serves.

RomeBERT on rotten_tomatoes from the shipped all-MiniLM-L6-v2, the shipped recipe: 10 to 15
minutes on a 2-core CPU, with progress bars. A bundle that is already there is reused; a build
killed half-way resumes from its last saved training state.
"""

from __future__ import annotations

import os
from pathlib import Path

from romebert.core.bundle import BundleError, load_bundle
from romebert.training.recipes import SHIPPED_METHOD, settings_of

DEFAULT_HOME = Path(os.environ.get("ROMEBERT_HOME", "artifacts"))
# The shipped method as the training benchmark trains it on rotten_tomatoes (training/recipes.py),
# seed 42: about ten minutes on two cores. Two epochs were measured 0.6 point short of 82% dev
# accuracy at full depth (docs/results.md).
DEFAULT_MODEL = dict(method=SHIPPED_METHOD, data="rotten_tomatoes") | settings_of("rotten_tomatoes", SHIPPED_METHOD)


def default_bundle_path(home: Path) -> Path:
    """Where the default bundle lives under `home` (built there by build_default_bundle)."""
    return home / "default-bundle"


def build_default_bundle(home: Path) -> Path:
    from romebert.model_export.export import export_bundle
    from romebert.model_export.optimize import AUTO
    from romebert.training.train import TrainConfig, train

    bundle, checkpoint = default_bundle_path(home), home / "default-checkpoint"
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

