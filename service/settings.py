"""Server settings: one dataclass, defaults here, each overridable by ROMEBERT_<NAME> in the environment.

The environment is how a container is configured (Dockerfile, compose, cluster manifests); the
`romebert serve` flags override it for a run by hand. Reading both into this one object means the
app never looks at os.environ itself, and tests build a Settings directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

POLICIES = ("complete", "regroup")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


@dataclass(frozen=True)
class Settings:
    bundle: str | None = None  # model bundle folder (Contract 2)
    host: str = "0.0.0.0"  # all interfaces: the server runs in a container behind a port mapping
    port: int = 8000
    device: str = "auto"  # auto, cpu or cuda
    workers: int = 1  # engine threads, each running its own batches
    threads: int | None = None  # onnxruntime CPU threads per worker (default: the cores this process may use / workers)
    max_batch: int = 32  # rows the engine runs together at most
    max_wait_ms: float = 0.0  # how long an idle batcher waits for a batch to fill (under load, batches fill while the engine runs)
    max_queue: int = 1024  # rows waiting for the engine; beyond it requests get 503
    max_items: int = 64  # texts in one request; beyond it 413
    max_body_bytes: int = 1_000_000  # request body size; beyond it 413
    policy: str = "complete"  # scheduler policy: run each batch to completion, or regroup at layer boundaries (docs/serving.md)
    graceful_timeout_s: float = 30.0  # how long SIGTERM waits for in-flight requests
    log_level: str = "info"

    def __post_init__(self) -> None:
        positive = ("port", "workers", "max_batch", "max_queue", "max_items", "max_body_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise SettingsError(f"threads must be positive, not {self.threads}")
        if self.max_wait_ms < 0:
            raise SettingsError(f"max_wait_ms must be >= 0, not {self.max_wait_ms}")
        if self.max_items > self.max_queue:
            raise SettingsError(f"max_items ({self.max_items}) cannot exceed max_queue ({self.max_queue}): such a request could never be queued")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.policy not in POLICIES:
            raise SettingsError(f"policy must be one of {POLICIES}, not {self.policy!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ROMEBERT_<NAME> variables, then `overrides` that are not None (CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"ROMEBERT_{field.name.upper()}")
            if raw is not None and raw != "":
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def value_type(field: dataclasses.Field) -> type:
    """int, float or str: what a setting's text (environment, command line) converts to."""
    kind = str(field.type)
    return int if "int" in kind else float if "float" in kind else str


def _parse(field: dataclasses.Field, raw: str) -> Any:
    try:
        return value_type(field)(raw)
    except ValueError:
        raise SettingsError(f"ROMEBERT_{field.name.upper()}={raw!r} is not a number") from None
