"""The `romebert` command: one entry point, one sub-command per stage.

Each stage's package owns its sub-commands (a `main(command, argv)` in its `cli` module). They are
imported only when called, so `romebert serve` on the serving image never imports torch. Ctrl+C,
or SIGTERM (a container stopped), ends any command with one line and exit code 130, not a
traceback, and its `finally` blocks run: an export removes its temporary folder (the default
SIGTERM would leave hundreds of MB behind). Commands that stop in their own way install their own
handlers: training saves its state first, a load test reports first, the server drains and exits 0.
"""

from __future__ import annotations

import importlib
import signal
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("romebert.training.cli", "train a multi-exit checkpoint (romebert, deebert or finetune)"),
    "evaluate": ("romebert.training.cli", "per-exit accuracy and the entropy-threshold sweep, with plots"),
    "export": ("romebert.model_export.cli", "split a checkpoint into per-layer ONNX segments (a bundle)"),
    "serve": ("romebert.service.cli", "serve a bundle over HTTP with per-request early exit"),
    "quickstart": ("romebert.quickstart", "build the default bundle if missing, then serve it"),
    "loadtest": ("romebert.loadtest.cli", "drive a running server and report latency and exit depth"),
}


def usage() -> str:
    lines = ["usage: romebert <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`romebert <command> --help` describes each command."]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"romebert: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(command, rest) or 0)
    except KeyboardInterrupt as err:  # its message, when it has one, says what was kept (training.train.TrainingStopped)
        print(f"romebert {command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
