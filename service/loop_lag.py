"""How far behind its event loop runs: the part of overload that admission's queue cannot see.

Admission predicts the wait for a worker from the rows queued. But past capacity on a small CPU
the event loop itself can fall behind (parsing, validating, tokenizing and answering every
request shares a core with the engine's threads and, on a test host, the load generator); the
requests it has not reached yet wait in socket buffers, counted nowhere, and the queue looks
short while admitted requests wait seconds. A timer that should fire every `interval_s` measures
how late it fires; while that lag exceeds the bound, the door refuses (cheaply) until the loop
has caught up.
"""

from __future__ import annotations

import asyncio


class LoopLag:
    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.seconds = 0.0  # how late the last tick fired

    async def run(self) -> None:
        """Measure forever (a task of the serving loop; cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.seconds = max(loop.time() - due, 0.0)
