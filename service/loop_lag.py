"""How far behind its event loop runs: the part of overload that admission's queue cannot see.

Admission predicts the wait for a worker from the rows queued. But past capacity on a small CPU
the event loop itself can fall behind (parsing, validating, tokenizing and answering every
request shares a core with the engine's threads and, on a test host, the load generator); the
requests it has not reached yet wait in socket buffers, counted nowhere, and the queue looks
short while admitted requests wait seconds. A timer that should fire every `interval_s` measures
how late it fires; while that lag exceeds the bound, the door refuses (cheaply) until the loop
has caught up.

The lag is the median lateness of the last three ticks, so that one tick out of line is ignored
either way: one stall (a garbage collection, the host taking the core for a moment) makes one tick
late and is over, and counting it would refuse requests to a loop that keeps up (the likeliest
cause of a 503 seen once in the test suite on a busy host); one punctual tick in an overload, the
loop catching up for a moment, would open the door to a burst that puts it behind again. (The
least of the three ignored the stall but not the punctual tick: at 4x capacity its admitted p99
was 3.8 s in one run of two.)
"""

from __future__ import annotations

import asyncio
from collections import deque

TICKS = 3


class LoopLag:
    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self._recent: deque[float] = deque([0.0], maxlen=TICKS)

    @property
    def seconds(self) -> float:
        """How late the loop runs: the median lateness of the last TICKS ticks."""
        return sorted(self._recent)[len(self._recent) // 2]

    def observe(self, late_s: float) -> None:
        self._recent.append(max(late_s, 0.0))

    async def run(self) -> None:
        """Measure forever (a task of the serving loop; cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(loop.time() - due)
