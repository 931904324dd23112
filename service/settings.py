"""Server settings: one dataclass, defaults here, each overridable by ROMEBERT_<NAME> in the environment.

The environment is how a container is configured (Dockerfile, compose, cluster manifests); the
`romebert serve` flags override it for a run by hand. Reading both into this one object means the
app never looks at os.environ itself, and tests build a Settings directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from romebert.service.cohorts import PAD_SLACK, SMALL_WIDTH
from romebert.service.policy import POLICIES


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


def _setting(default: Any, help: str) -> Any:
    """A setting's default and its one description (the `romebert serve --help` text)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    bundle: str | None = _setting(None, "model bundle folder (default: $ROMEBERT_BUNDLE)")
    host: str = _setting("0.0.0.0", "interface to listen on (all: the server runs in a container behind a port mapping)")
    port: int = _setting(8000, "TCP port")
    device: str = _setting("auto", "cuda: every session on the CUDA provider or exit 2; cpu; auto: CUDA when a probe session really "
                           "runs there, else the CPU with a warning")
    backend: str = _setting("auto", "auto: the backend the bundle's export measured fastest within its accuracy rule (manifest "
                            "'backend'); onnxruntime: onnxruntime's own providers; openvino: OpenVINO on the CPU (onnxruntime's plugin on Intel, OpenVINO's own runtime elsewhere)")
    openvino_precision: str = _setting("bf16", "with --backend openvino: bf16 (AMX/AVX512-BF16 CPUs) or f32")
    workers: int = _setting(1, "engine threads, each running its own batches: 1 for the lowest latency of a lone request, "
                            "more for throughput under load on a CPU on onnxruntime (on OpenVINO two let the wait "
                            "past capacity run to seconds: docs/serving.md, Workers)")
    threads: int | None = _setting(None, "onnxruntime's CPU threads: the shared pool every worker's calls use (with --spin off, each session's own pool) "
                                   "(default: the cores this process may use divided by workers, so that workers x threads = cores)")
    spin: bool = _setting(True, "onnxruntime's CPU threads spin-wait between calls in one shared pool (the quickest lone request); "
                           "off: each session's own pool, whose threads sleep (less CPU per request, more left for the HTTP "
                           "side under load)")
    engine_nice: int = _setting(0, "how many nice levels the engine's threads run below the event loop's (Linux; 0 to 19): 10 "
                                "keeps a fast onnxruntime engine (int8) from starving the loop past capacity, at a few percent "
                                "of throughput elsewhere (docs/serving.md, The engine runs below the event loop, when asked)")
    max_batch: int = _setting(32, "rows the engine runs together at most")
    max_batch_tokens: int = _setting(2048, "rows x padded tokens the engine runs together at most (wider rows come in smaller "
                                     "batches; one row of any length always runs): bounds the largest shape, and so the memory "
                                     "OpenVINO keeps for it")
    pad_slack: float = _setting(PAD_SLACK, "rows of different lengths share a batch only while, padded to the longest, it holds at "
                                f"most this many times their real tokens (rows up to {SMALL_WIDTH} tokens wide share freely): higher "
                                "means fuller batches and more padding, lower more and smaller engine calls")
    max_wait_ms: float = _setting(0.0, "how long an idle worker waits for a batch to fill (0: a lone request starts at once; "
                                  "under load, batches fill while the engine runs)")
    max_queue_wait_ms: float = _setting(250.0, "admission bound: a request is let in only when its predicted queue wait fits, "
                                        "and a row that has waited longer gets 503 instead of running")
    max_loop_lag_ms: float = _setting(50.0, "admission bound on the event loop: while it runs later than this (it parses, validates and "
                                      "answers every request), new requests get 503 at once, until it has caught up")
    max_queue: int = _setting(1024, "rows waiting for a worker at most, whatever the predicted wait")
    max_items: int = _setting(64, "texts per request before 413")
    max_body_bytes: int = _setting(1_000_000, "request body bytes before 413")
    policy: str = _setting("complete", "complete (run each batch to its end) or regroup (admit and merge at layer boundaries)")
    request_timeout_s: float = _setting(30.0, "a request still unanswered after this gets 503 and its rows are dropped")
    header_timeout_s: float = _setting(10.0, "a request's headers must arrive within this, else 408 and the connection is closed")
    body_timeout_s: float = _setting(10.0, "a request's body must arrive within this after its headers, else 408 and closed")
    keep_alive_s: float = _setting(5.0, "an idle keep-alive connection is closed after this")
    graceful_timeout_s: float = _setting(30.0, "on SIGTERM, the longest the drain may take; queued rows predicted not to start "
                                         "within 80%% of it get 503 with Retry-After at once")
    access_log: bool = _setting(False, "log one line per request (off by default: it costs more than the HTTP handling of a short request)")
    log_level: str = _setting("info", "critical, error, warning, info or debug")

    def __post_init__(self) -> None:
        positive = ("port", "workers", "max_batch", "max_batch_tokens", "max_queue", "max_items", "max_body_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        if self.port > 65535:  # uvicorn would take it modulo 2**16 and listen on some other port
            raise SettingsError(f"port must be at most 65535, not {self.port}")
        if self.threads is not None and self.threads <= 0:
            raise SettingsError(f"threads must be positive, not {self.threads}")
        if not 0 <= self.engine_nice <= 19:
            raise SettingsError(f"engine_nice must be from 0 to 19 (nice levels below the event loop), not {self.engine_nice}")
        if not self.pad_slack >= 1:
            raise SettingsError(f"pad_slack must be at least 1 (a batch holds at least its real tokens), not {self.pad_slack}")
        if self.max_wait_ms < 0:
            raise SettingsError(f"max_wait_ms must be >= 0, not {self.max_wait_ms}")
        for name in ("max_queue_wait_ms", "max_loop_lag_ms", "request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s", "graceful_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        if self.max_wait_ms >= self.max_queue_wait_ms:
            raise SettingsError(f"max_wait_ms ({self.max_wait_ms}) must be below max_queue_wait_ms ({self.max_queue_wait_ms}): "
                                "a batching window as long as the wait bound would expire every row it holds")
        if self.max_items > self.max_queue:
            raise SettingsError(f"max_items ({self.max_items}) cannot exceed max_queue ({self.max_queue}): such a request could never be queued")
        if self.backend not in ("auto", "onnxruntime", "openvino"):
            raise SettingsError(f"backend must be auto, onnxruntime or openvino, not {self.backend!r}")
        if self.openvino_precision not in ("bf16", "f32"):
            raise SettingsError(f"openvino_precision must be bf16 or f32, not {self.openvino_precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.policy not in POLICIES:
            raise SettingsError(f"policy must be one of {tuple(POLICIES)}, not {self.policy!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ROMEBERT_<NAME> variables, then `overrides` that are not None (CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in dataclasses.fields(cls):
            raw = environ.get(f"ROMEBERT_{setting.name.upper()}")
            if raw is not None and raw != "":
                values[setting.name] = _parse(setting, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def value_type(field: dataclasses.Field) -> Callable[[str], Any]:
    """What a setting's text (environment, command line) converts with: int, float, a bool or str."""
    kind = str(field.type)
    return boolean if "bool" in kind else int if "int" in kind else float if "float" in kind else str


def boolean(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off. (Named so that argparse says "invalid boolean value".)"""
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{raw!r} is not a boolean")
    return value in ("1", "true", "yes", "on")


def _parse(field: dataclasses.Field, raw: str) -> Any:
    try:
        return value_type(field)(raw)
    except ValueError:
        raise SettingsError(f"ROMEBERT_{field.name.upper()}={raw!r} is not a valid {str(field.type).split()[0]}") from None
