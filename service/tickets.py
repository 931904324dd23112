"""What travels through the serving layer: a row per text, a ticket per request, and how a ticket ends.

Rows of one request may leave at different layers and even on different workers; the ticket
collects their answers and hands the whole request back to the event loop once, when the last
row is answered. A ticket that is closed early (the client left, its rows waited too long, the
server is draining, a worker died) needs no more work: rows whose ticket is closed are dropped
from the queue and from their batches before the next layer.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

import numpy as np

from romebert.core.tokenization import TokenRow


class Rejected(Exception):
    """The request gets no model answer: 503 with Retry-After (overloaded, draining, a dead worker)."""

    def __init__(self, code: str, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The Retry-After header: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class EngineFailure(RuntimeError):
    """The engine raised while these rows were in flight (logged with its traceback): a 500."""


@dataclass(frozen=True)
class Exit:
    """The answer for one row: the logits of the exit it left at, and why it left there."""

    logits: np.ndarray  # (C,)
    probabilities: np.ndarray  # (C,) softmax of the logits, float64 (worked out by the worker with the entropy, for the whole cohort at once)
    exit_layer: int  # 1-based; also the number of layers run for the row
    entropy: float
    budget_exhausted: bool
    latency_s: float  # from arrival to answer, on the scheduler's clock


class Ticket:
    """One request's rows on their way through the scheduler."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop):
        self.answers: list[Exit | None] = [None] * size
        self.future: asyncio.Future = loop.create_future()
        self.closed_because: str | None = None  # set when it closes without all its answers
        self.started = False  # a row of it has started its first layer: its other rows no longer expire (admission.py)
        self._loop = loop
        self._pending = size
        self._lock = threading.Lock()  # rows of one ticket may be answered by two workers at once

    @property
    def closed(self) -> bool:
        return self._pending == 0 or self.closed_because is not None

    def answer(self, index: int, exit: Exit) -> None:
        with self._lock:
            if self.closed:
                return
            self.answers[index] = exit
            self._pending -= 1
            done = self._pending == 0
        if done:
            self._deliver(self.answers)

    def fail(self, error: BaseException, because: str) -> bool:
        """End the ticket with an error (no-op if it is closed already); True if this call ended it."""
        with self._lock:
            if self.closed:
                return False
            self.closed_because = because
        self._deliver(error)
        return True

    def cancel(self) -> None:
        """Nobody waits any more (the client left, or the request's deadline passed); call from the loop."""
        with self._lock:
            if not self.closed:
                self.closed_because = "cancelled"
        self.future.cancel()  # an answer already on its way to the loop is then dropped by _settle

    def _deliver(self, result: list[Exit] | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(_settle, self.future, result)
        except RuntimeError:  # the loop is closed: the process is going away
            pass


def _settle(future: asyncio.Future, result: list[Exit] | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass(eq=False, slots=True)
class Row:
    tokens: TokenRow
    threshold: float
    arrival: float  # scheduler clock
    deadline: float  # arrival + latency budget; inf without one
    ticket: Ticket
    index: int  # position in its request

    def __len__(self) -> int:
        return len(self.tokens)
