"""The load generator: asyncio and aiohttp in one process, closed or open loop.

Closed loop: `users` tasks, each sending its next request when the last one returns. Open loop:
request k leaves at t0 + k / rate whatever the latency, so a slow server cannot slow the
arrivals down (the mistake that hides overload); at most `users` requests are in flight, and a
send whose turn comes while all are busy is not made and is counted as unsent. A run reports the
rate it really achieved: one event loop holds a few thousand requests/s on one core, and past that
the report says so rather than quietly sending fewer. It also says when the sends held the rate on
average but left late, more than one interval at p99 (a generator short of CPU for moments sends in
bursts). (Locust, which `loadtest/locustfile.py` still
drives for distributed runs, ramps its users up at 100/s and fell short of such rates.)

A closed loop's users resend at once after a refusal by default, the most load a user can make.
With `honour_retry_after`, a user answered 429 or 503 with a Retry-After waits that long first, as
a well-behaved client does; past capacity that is the load the server's own Retry-After asks for.

Ctrl+C (or SIGTERM) ends a run early as its duration would: no new request is sent, the ones in
flight get their answers, and the run is reported, stopped by "interrupt". A second one ends the
process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from typing import AsyncIterator

import aiohttp

from romebert.loadtest.records import RequestRecord, RunResult, record_of
from romebert.loadtest.workload import Workload

DEFAULT_USERS = 4
MAX_OPEN_LOOP_POOL = 2000
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROMPT_S = 0.1  # an open loop's wait for its next send longer than this ends at once on a stop


def pool_size(users: int | None, rate: float | None) -> int:
    """Closed loop: the users asked for (default DEFAULT_USERS). Open loop: the most requests in
    flight at once; by default one per request/s (a second of latency), at most MAX_OPEN_LOOP_POOL."""
    if users is not None:
        return users
    return min(max(1, int(rate) + 1), MAX_OPEN_LOOP_POOL) if rate else DEFAULT_USERS


def run_load(url: str, workload: Workload, users: int, rate: float | None, duration_s: float,
             max_requests: int | None, timeout_s: float, *, honour_retry_after: bool = False) -> RunResult:
    if honour_retry_after and rate is not None:
        raise ValueError("honour_retry_after is for the closed loop: an open loop's arrivals do not wait for answers")
    return asyncio.run(_run(url, workload, users, rate, duration_s, max_requests, timeout_s, honour_retry_after))


def retry_after_s(status: int, value: str | None) -> float:
    """Seconds a refused request's Retry-After asks for (delay-seconds; 0 when absent, unreadable or not a refusal)."""
    if status not in (429, 503) or value is None:
        return 0.0
    try:
        return max(float(value), 0.0)
    except ValueError:  # an HTTP date: the server never sends one
        return 0.0


async def _run(url: str, workload: Workload, users: int, rate: float | None, duration_s: float,
               max_requests: int | None, timeout_s: float, honour_retry_after: bool = False) -> RunResult:
    connector = aiohttp.TCPConnector(limit=users, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    budget = max_requests if max_requests is not None else float("inf")
    issued = 0
    stop = asyncio.Event()

    def stop_reason() -> str:
        return "interrupt" if stop.is_set() else "max-requests" if issued >= budget else "duration"

    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session, _stopped_by_signals(stop):

        async def send(rng: random.Random, slot: float) -> float:
            """One request, recorded; the seconds its Retry-After asks for (0 for none)."""
            request = workload.draw(rng)
            started = time.perf_counter()
            status, text, retry_after = 0, None, None
            try:
                async with session.post("/classify", data=json.dumps(request.body), headers={"content-type": "application/json"}) as response:
                    status, text, retry_after = response.status, await response.text(), response.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            records.append(record_of(status, text, request, started - t0, (time.perf_counter() - started) * 1000,
                                     (started - slot) * 1000))
            return retry_after_s(status, retry_after)

        if rate is None:
            async def user(k: int) -> None:
                nonlocal issued
                rng = random.Random(f"{workload.seed}:{k}")
                while time.perf_counter() < deadline and issued < budget and not stop.is_set():
                    issued += 1
                    wait = await send(rng, time.perf_counter())
                    if honour_retry_after and wait:
                        await _pause(stop, min(wait, max(deadline - time.perf_counter(), 0.0)))

            await asyncio.gather(*(user(k) for k in range(users)))
            return RunResult(records, time.perf_counter() - t0, stop_reason(), 0)

        rng = random.Random(workload.seed)
        in_flight: set[asyncio.Task] = set()
        unsent = 0
        while issued < budget:
            slot = t0 + issued / rate
            if slot >= deadline:
                break
            if (wait := slot - time.perf_counter()) > 0:
                await _pause(stop, wait)
            if stop.is_set():
                break
            issued += 1
            if len(in_flight) >= users:
                unsent += 1
                continue
            task = asyncio.create_task(send(rng, slot))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:  # the last sends get their answers (or their timeout)
            await asyncio.wait(in_flight, timeout=timeout_s)
        abandoned = len(in_flight)
        for task in list(in_flight):
            task.cancel()
        return RunResult(records, time.perf_counter() - t0, stop_reason(), abandoned, unsent)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but end a long wait as soon as `stop` is set (a short one just runs out: no task per send)."""
    if seconds <= PROMPT_S:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@contextlib.asynccontextmanager
async def _stopped_by_signals(stop: asyncio.Event) -> AsyncIterator[None]:
    """While the run lasts, a first SIGINT or SIGTERM sets `stop` and a second raises
    KeyboardInterrupt. Both go through the event loop's own signal handling, which wakes the loop
    whichever thread the signal lands on (a handler of Python's alone would wait for the loop's
    next event, which a stalled server may not send); the handlers that were there come back when
    the run ends."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_signal() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
