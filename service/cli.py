"""`romebert serve [BUNDLE] [--host ... --port ...]`: check the bundle, then run uvicorn.

Flags are generated from the Settings fields (flag > ROMEBERT_<NAME> > default), so Settings stays
the one place where a setting, its type and its default are written. A bad bundle or a port that
cannot be listened on stops the start before the model loads, with one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import socket
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from romebert.service.settings import POLICIES, Settings, SettingsError, value_type

if TYPE_CHECKING:
    from romebert.service.runtime import Runtime

_CHOICES = {"device": ("auto", "cpu", "cuda"), "backend": ("auto", "onnxruntime", "openvino"), "openvino_precision": ("bf16", "f32"), "policy": tuple(POLICIES), "log_level": ("critical", "error", "warning", "info", "debug")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="romebert serve",
        description="Serve a model bundle over HTTP: POST /classify, GET /metrics, /healthz, /readyz, /docs. "
        "Every option can also be set as ROMEBERT_<OPTION> in the environment (e.g. ROMEBERT_MAX_BATCH).",
    )
    for field in dataclasses.fields(Settings):
        help_ = field.metadata["help"] + ("" if field.default is None else f" (default: {field.default})")
        if field.name == "bundle":
            parser.add_argument("bundle", nargs="?", default=None, help=field.metadata["help"])
        else:
            parser.add_argument("--" + field.name.replace("_", "-"), type=value_type(field), default=None,
                                choices=_CHOICES.get(field.name), help=help_)
    return parser


def _check(settings: Settings) -> None:
    """What would stop the server anyway, found before uvicorn starts (raises with the reason):
    the bundle's checksums, and the device (a probe session must really run where it was asked)."""
    from romebert.core.bundle import load_bundle
    from romebert.core.engine import resolve_device

    if not settings.bundle:
        raise SettingsError("no model bundle given (romebert serve BUNDLE, or ROMEBERT_BUNDLE)")
    bundle = load_bundle(settings.bundle)
    resolve_device(settings.device, probe=bundle.path(bundle.segments[0].file) if settings.device == "cuda" else None)


def _bound_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's addresses, bound before anything starts: every address the host resolves to,
    as uvicorn binds them (IPv6 sockets IPv6 only, as asyncio makes them). uvicorn binds only after
    the app's start-up has begun loading the bundle, and a port in use then ends in its log lines
    and exit code 3; here it is one line and exit code 2, like any other setting that cannot work."""
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                                flags=socket.AI_PASSIVE)):
            bound.append(sock := socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        return bound
    except OSError as err:
        for sock in bound:
            sock.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def settings_of(argv: list[str]) -> Settings:
    """The settings a `romebert serve` command line asks for, the environment's included: argparse
    exits 2 on an unknown or malformed option, SettingsError names a value the server cannot run
    with. Nothing is checked on disk (`romebert quickstart` asks before its bundle exists)."""
    return Settings.from_env(**vars(_parser().parse_args(argv)))


def main(command: str, argv: list[str]) -> int:
    try:
        settings = settings_of(argv)
        _check(settings)
        listeners = _bound_sockets(settings.host, settings.port)
    except (SettingsError, RuntimeError, ValueError) as err:  # BundleError is a RuntimeError
        print(f"romebert {command}: error: {err}", file=sys.stderr)
        return 2
    return serve(settings, listeners)


def serve(settings: Settings, listeners: list[socket.socket]) -> int:
    """Run uvicorn on `listeners` until SIGTERM/SIGINT, then drain; the exit status as `Server.exit_status` says."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(settings)
    # uvicorn re-raises the signal that stopped it once shutdown is complete; with a Python handler
    # in place that re-raise returns here, and a graceful SIGTERM exits 0 instead of dying of it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    addresses = [sock.getsockname()[:2] for sock in listeners]
    logging.getLogger("romebert.serve").info("listening on %s (/readyz says when the model is ready; Ctrl+C to stop)",
                                             ", ".join(f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}" for h, p in addresses))
    server.run(sockets=listeners)
    return server.exit_status


def build_server(settings: Settings, **app_options: Any) -> Server:
    """The app behind uvicorn: our protocol (header deadline, admission door), keep-alive and drain limits, and the
    runtime's failures wired to a shutdown. `app_options` go to create_app (tests stub the engine)."""
    from romebert.service.app import create_app
    from romebert.service.connections import serving_protocol

    app = create_app(settings, **app_options)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s), timeout_keep_alive=int(settings.keep_alive_s), lifespan="on",
        server_header=False,  # no "server: uvicorn" on every answer: it tells clients nothing they need
        http=serving_protocol(settings.header_timeout_s, settings.body_timeout_s, app.state.runtime.door, app.state.runtime.metrics),
    )
    return Server(config, app.state.runtime)


class Server(uvicorn.Server):
    """uvicorn's server, telling the runtime the moment SIGTERM/SIGINT arrives, and stopping when
    the runtime fails. uvicorn stops accepting connections and waits for in-flight requests, and
    only after that runs the lifespan shutdown; draining at once makes /readyz and any new request
    say 503 meanwhile."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        runtime.request_exit = self._stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # In a thread: this runs inside a signal handler, which may have interrupted the event
        # loop while it held the admission lock.
        threading.Thread(target=self.runtime.begin_drain, name="romebert-drain").start()
        super().handle_exit(sig, frame)

    def _stop(self, code: int) -> None:
        """The runtime failed (from any thread): uvicorn's main loop sees the flag and shuts down."""
        self.should_exit = True

    @property
    def exit_status(self) -> int:
        """0 after a graceful stop; the runtime's code when it failed (2: the bundle or the device
        cannot load, 1: a worker died); 1 if the server never started."""
        if self.runtime.exit_code is not None:
            return self.runtime.exit_code
        return 0 if self.started else 1
