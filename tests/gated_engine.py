"""The real engine with a gate on its layer calls, so a test can hold rows in flight."""

from __future__ import annotations

import threading


class Gated:
    """The real engine, whose layer calls wait while `gate` is closed (cleared) and raise `error`
    when one is set."""

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0
        self.error: Exception | None = None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def layer(self, i, state):
        self.entered += 1
        assert self.gate.wait(timeout=20)
        if self.error:
            raise self.error
        return self.engine.layer(i, state)
