"""`romebert serve [BUNDLE] [--host ... --port ...]`: check the bundle, then run uvicorn.

Flags are generated from the Settings fields (flag > ROMEBERT_<NAME> > default), so Settings stays
the one place where a setting, its type and its default are written. A bad bundle stops the start
before any port is bound, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from types import FrameType
from typing import Callable

import uvicorn

from romebert.service.settings import POLICIES, Settings, SettingsError, value_type

_HELP = {
    "bundle": "model bundle folder (default: $ROMEBERT_BUNDLE)",
    "device": "auto (CUDA if onnxruntime has it), cpu or cuda",
    "workers": "engine threads, each running its own batches: 1 for the lowest latency of a lone request, "
    "more for throughput under load on a CPU (each gets cores/workers threads)",
    "threads": "onnxruntime CPU threads per worker (default: the cores this process may use, divided by workers)",
    "max_batch": "rows the engine runs together at most",
    "max_wait_ms": "how long an idle batcher waits for a batch to fill (0: a lone request starts at once; under load, batches fill while the engine runs)",
    "max_queue": "rows waiting for the engine before requests get 503",
    "max_items": "texts per request before 413",
    "max_body_bytes": "request body bytes before 413",
    "policy": "complete (run each batch to its end) or regroup (admit and merge at layer boundaries)",
    "graceful_timeout_s": "on SIGTERM, how long to wait for in-flight requests",
}
_CHOICES = {"device": ("auto", "cpu", "cuda"), "policy": POLICIES, "log_level": ("critical", "error", "warning", "info", "debug")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="romebert serve",
        description="Serve a model bundle over HTTP: POST /classify, GET /metrics, /healthz, /readyz, /docs. "
        "Every option can also be set as ROMEBERT_<OPTION> in the environment (e.g. ROMEBERT_MAX_BATCH).",
    )
    parser.add_argument("bundle", nargs="?", default=None, help=_HELP["bundle"])
    for field in dataclasses.fields(Settings):
        if field.name != "bundle":
            parser.add_argument(
                "--" + field.name.replace("_", "-"), type=value_type(field), default=None, choices=_CHOICES.get(field.name),
                help=_HELP.get(field.name, field.name.replace("_", " ")) + ("" if field.default is None else f" (default: {field.default})"),
            )
    return parser


def _check(settings: Settings) -> None:
    """What would stop the server anyway, found before uvicorn starts (raises with the reason)."""
    from romebert.core.bundle import load_bundle
    from romebert.core.engine import resolve_device

    if not settings.bundle:
        raise SettingsError("no model bundle given (romebert serve BUNDLE, or ROMEBERT_BUNDLE)")
    load_bundle(settings.bundle)
    resolve_device(settings.device)


def main(command: str, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(**vars(args))
        _check(settings)
    except (SettingsError, RuntimeError, ValueError) as err:  # BundleError is a RuntimeError
        print(f"romebert {command}: error: {err}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    """Run uvicorn until SIGTERM/SIGINT; then drain and return 0 (1 if the server never started)."""
    from romebert.service.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_timeout_s, lifespan="on",
    )
    server = _Server(config, on_exit=app.state.runtime.begin_drain)
    # uvicorn re-raises the signal that stopped it once shutdown is complete; with a Python handler
    # in place that re-raise returns here, and a graceful SIGTERM exits 0 instead of dying of it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app the moment SIGTERM/SIGINT arrives. uvicorn then stops
    accepting connections and waits for in-flight requests, and only after that runs the lifespan
    shutdown; calling `on_exit` at once makes /readyz and any new request say 503 meanwhile."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
