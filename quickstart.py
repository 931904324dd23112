"""`romebert quickstart`: the first command a newcomer runs.

Builds the default bundle once (RomeBERT on rotten_tomatoes from the shipped all-MiniLM-L6-v2,
the shipped recipe: 10 to 16 minutes on a 2-core CPU, with progress bars), then serves it. A bundle
that is already there is reused; a run killed half-way resumes from its last saved training state.
Serving replaces this process with a fresh `romebert serve` (exec): the server never holds the
torch and training memory the build needed, and keeps this process's PID for signals. Any other
option is `romebert serve`'s (e.g. --port 9000), checked before the build starts.

The one command that spans two packages, model_export (the build) and service (the server's
options), so it sits at the top beside cli.py, not inside either.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from romebert.model_export.default_bundle import DEFAULT_HOME, build_default_bundle, default_bundle_path
from romebert.service.cli import settings_of
from romebert.service.settings import SettingsError


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="romebert quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="where the default checkpoint and bundle live")
    parser.add_argument("--build-only", action="store_true", help="build the bundle, do not serve")
    args, serve_args = parser.parse_known_args(argv)
    if not args.build_only:
        try:  # a mistyped server option is found now, not after a quarter of an hour of building
            settings_of([str(default_bundle_path(args.home)), *serve_args])
        except SettingsError as err:
            print(f"romebert {command}: error: {err}", file=sys.stderr)
            return 2
    bundle = build_default_bundle(args.home)
    if args.build_only:
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "romebert.cli", "serve", str(bundle), *serve_args])
