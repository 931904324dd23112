"""Admission and the queue: who may wait for a worker, and for how long.

A request is let in only when the queue wait predicted for it fits the server's bound
(`max_queue_wait_ms`) and, when it has one, its own latency budget (a budgeted row that starts
gets at least exit 1's answer, so only a wait longer than the budget makes it hopeless);
otherwise it gets a fast 503 whose Retry-After comes from the predicted wait. The prediction is
the work ahead of it, queued rows plus half the rows in flight, times the measured engine seconds
per answered row (early exits included), shared out over the workers. A budgeted row has less
ahead of it: the workers take it at a layer boundary once it cannot wait (budgets.py), so it
waits for the budgeted rows queued before it and half a step. It is an estimate; the bound is
kept for certain at the other end: a row that has waited past it when a worker would take it,
or when its length group would start (under "regroup" a worker takes new rows as length groups
that start one after another), is answered 503 instead of run. The bound is on the wait for
other requests' work: once a row of a request has started, the rest of it is that request's own
work, so its other rows no longer expire (a request of many texts, admitted at an idle server,
may take longer than the bound to run, and one row expiring fails all of it). Past capacity the queue
therefore holds about one bound's worth of work, the workers stay busy, and the rest is turned
away at the door, most of it before its body is read (connections.py).

Rows whose ticket is closed (the client left, the request's deadline passed) are dropped when a
worker reaches them, so no work is done for clients that have gone.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from romebert.service.cost_model import ServiceRate
from romebert.service.metrics import Metrics
from romebert.service.tickets import Rejected, Row


class Admission:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_queue: int,
        max_queue_wait_s: float,
        workers: int,
        seconds_per_row: float,
        loop_lag_s: Callable[[], float] = lambda: 0.0,
        max_loop_lag_s: float = math.inf,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.metrics = metrics
        self.loop_lag_s = loop_lag_s  # how late the event loop runs now (the HTTP layer measures it)
        self.max_loop_lag_s = max_loop_lag_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.workers = workers
        self.clock = clock
        self.rate = ServiceRate(seconds_per_row)
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0  # rows taken by workers and not yet answered or dropped
        self._budgeted = 0  # queued rows with a latency budget (urgent rows are looked for only then)
        self._closed = False
        self._drain_deadline = math.inf
        self._filling_since = 0.0  # time.monotonic() when the queue last became non-empty (the batching window)

    # -- the event loop's side -------------------------------------------------------------
    def predicted_wait(self) -> float:
        """Seconds a row arriving now would wait for a worker (call with the lock held)."""
        return (len(self._queue) + self._in_flight / 2) * self.rate.seconds_per_row / self.workers

    def predicted_budgeted_wait(self) -> float:
        """Seconds a row with a budget arriving now would wait (call with the lock held): it
        jumps the queue, so only the budgeted rows queued before it and the rest of a step in
        progress are ahead of it."""
        step = self.rate.seconds_per_step / 2 if self._queue or self._in_flight else 0.0
        return (self._budgeted * self.rate.seconds_per_row + step) / self.workers

    def door(self) -> Rejected | None:
        """The part of admission that needs no request: cheap enough (no lock, an estimate) to run
        before the body is read or parsed, so that past capacity a refusal costs next to nothing.
        The event loop's lag first: while the loop is behind, a queue that looks short says nothing."""
        if self._closed:
            return self._refuse("draining", Rejected("shutting_down", "the server is shutting down"))
        lag = self.loop_lag_s()
        if lag > self.max_loop_lag_s:
            return self._refuse("loop_lag", Rejected(
                "overloaded", f"the server runs {1000 * lag:.0f} ms behind on its connections, over its bound of "
                f"{1000 * self.max_loop_lag_s:.0f} ms; retry later", 2 * lag))
        wait = self.predicted_wait()
        if wait > self.max_queue_wait_s:
            return self._refuse("predicted_wait", Rejected(
                "overloaded", f"the predicted queue wait of {1000 * wait:.0f} ms exceeds the server's bound of "
                f"{1000 * self.max_queue_wait_s:.0f} ms; retry later", wait))
        return None

    def admit(self, rows: list[Row], budget_s: float | None) -> None:
        """Queue every row (all or none), or raise Rejected saying why and when to come back."""
        with self._cond:
            refused = self.door()
            if refused is not None:
                raise refused
            wait = self.predicted_wait()
            self.metrics.predicted_wait.set(wait)
            if budget_s is not None and (budgeted_wait := self.predicted_budgeted_wait()) > budget_s:
                raise self._refuse("budget", Rejected(
                    "overloaded", f"the predicted wait of {1000 * budgeted_wait:.0f} ms for a request with a budget exceeds its "
                    f"budget of {1000 * budget_s:.0f} ms; retry later", budgeted_wait))
            if len(self._queue) + len(rows) > self.max_queue:
                raise self._refuse("queue_full", Rejected(
                    "overloaded", f"the queue is full ({len(self._queue)} rows, room for {self.max_queue - len(self._queue)})", wait))
            if not self._queue:
                self._filling_since = time.monotonic()
            self._queue.extend(rows)
            self._budgeted += sum(row.deadline < math.inf for row in rows)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()

    def _refuse(self, reason: str, error: Rejected) -> Rejected:
        self.metrics.rejected.labels(reason).inc()
        return error

    # -- the workers' side -----------------------------------------------------------------
    def wait_for_rows(self, fill: int, window_s: float) -> bool:
        """Block until rows are queued; give a batch `window_s` after its first row to reach
        `fill` rows. False once closed with nothing left: the worker may stop."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return False
                self._cond.wait()
            window_end = self._filling_since + window_s
            while len(self._queue) < fill and not self._closed and (remaining := window_end - time.monotonic()) > 0:
                self._cond.wait(remaining)
            return True

    def take(self, n: int, pick: Callable[[list[Row]], list[Row]] | None = None) -> list[Row]:
        """Up to n rows to run, oldest first, skipping (and answering) the ones that must not run.
        With `pick`, only the rows it picks out of those start; the others keep their place in the queue."""
        with self._cond:
            return self._pop(n, lambda row: True, pick)

    def take_urgent(self, must_start_by: Callable[[], float], n: int) -> list[Row]:
        """Up to n budgeted rows whose deadline comes before `must_start_by()` (scheduler clock),
        which is asked only when budgeted rows are queued (a worker's costs a prediction a layer)."""
        with self._cond:
            if not self._budgeted:
                return []
            by = must_start_by()
            return self._pop(n, lambda row: row.deadline < by)

    def _pop(self, n: int, wanted: Callable[[Row], bool], pick: Callable[[list[Row]], list[Row]] | None = None) -> list[Row]:
        now = self.clock()
        taken: list[Row] = []
        seen: list[Row] = []  # every runnable row popped, in queue order
        while self._queue and len(taken) < n:
            row = self._queue.popleft()
            if not self._runnable(row, now):
                self._budgeted -= row.deadline < math.inf
                continue
            seen.append(row)
            if wanted(row):
                taken.append(row)
        if pick is not None and taken:
            taken = pick(taken)
        started = set(taken)  # rows compare by identity
        self._queue.extendleft(reversed([row for row in seen if row not in started]))
        self._budgeted -= sum(row.deadline < math.inf for row in taken)
        self._in_flight += len(taken)
        self.metrics.queue_depth.set(len(self._queue))
        for row in taken:
            self.metrics.queue_wait.observe(max(now - row.arrival, 0.0))
        return taken

    def _runnable(self, row: Row, now: float) -> bool:
        """False for a row that must not run (answered here, or dropped with its closed ticket)."""
        if row.ticket.closed:
            self.metrics.shed_rows.labels(row.ticket.closed_because or "cancelled").inc()
            return False
        if self._late(row, now):
            return False
        if now + self.rate.seconds_per_row > self._drain_deadline:
            self._fail(row, "draining", Rejected("shutting_down", "the server is shutting down before this request's turn"))
            return False
        return True

    def _late(self, row: Row, now: float) -> bool:
        """True, and the row answered 503, when it has waited past the bound for others' work (call with the lock held)."""
        if now - row.arrival <= self.max_queue_wait_s or row.ticket.started:
            return False
        self._fail(row, "expired", Rejected(
            "overloaded", f"waited {1000 * (now - row.arrival):.0f} ms in the queue, over the server's bound of "
            f"{1000 * self.max_queue_wait_s:.0f} ms; retry later", self.predicted_wait()))
        return True

    def expire(self, rows: list[Row]) -> np.ndarray:
        """Flag, and answer 503, the rows among `rows` (taken, not yet started) that have now waited
        past the bound: a length group taken with others and started after them is held to the
        bound again. They leave the in-flight count without adding to the service rate (rows that
        expire in the queue never reach it either). The others start: their requests' rows left
        in the queue or in other length groups are held to no bound from now on."""
        with self._cond:
            now = self.clock()
            late = np.fromiter((self._late(row, now) for row in rows), dtype=bool, count=len(rows))
            self._in_flight -= int(late.sum())
            for row in rows:  # (a late row's ticket is closed: its other rows are dropped anyway)
                row.ticket.started = True
            return late

    def _fail(self, row: Row, reason: str, error: Rejected) -> None:
        self.metrics.shed_rows.labels(reason).inc()
        row.ticket.fail(error, reason)

    def done(self, rows: int, seconds: float, stepped: bool = True) -> None:
        """A worker's step took `seconds`; after it `rows` of its rows left (answered or dropped).
        `stepped` is False when it ran no layer (its rows were all cut or dropped): its time still
        counts for the rows, but it says nothing about how long a layer boundary takes to come."""
        with self._cond:
            self._in_flight -= rows
            self.rate.record(seconds, rows, stepped)

    def release(self, rows: int) -> None:
        """`rows` rows in flight left unserved (their engine call failed): they say nothing about
        the service rate, which would otherwise read them as rows served in no time."""
        with self._cond:
            self._in_flight -= rows

    # -- closing ---------------------------------------------------------------------------
    def close(self, drain_s: float = math.inf) -> None:
        """Take no new rows. Queued rows predicted not to start within `drain_s` are answered 503
        now; the workers serve the rest and then stop."""
        with self._cond:
            self._closed = True
            self._drain_deadline = self.clock() + drain_s
            if drain_s < math.inf:
                fits = max(int(drain_s * self.workers / max(self.rate.seconds_per_row, 1e-9)) - self._in_flight, 0)
                error = Rejected("shutting_down", "the server is shutting down before this request's turn")
                while len(self._queue) > fits:
                    row = self._queue.pop()
                    self._budgeted -= row.deadline < math.inf
                    self._fail(row, "draining", error)
                self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()

    def fail_all(self, error: Rejected, reason: str) -> None:
        """Answer every queued row with `error` (a worker died: nobody will run them)."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._fail(self._queue.popleft(), reason, error)
            self._budgeted = 0
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
