"""The engine's workers: take rows, run one layer for one cohort at a time, let confident rows leave.

The event loop only submits and awaits; worker threads run the engine (onnxruntime releases the
GIL, so HTTP keeps being served while a layer runs). Each worker takes rows from the one queue
(admission.py) and keeps its own cohorts (cohorts.py). Each step runs ONE layer for ONE cohort,
chosen by the policy (policy.py); after it, the rows whose exit is confident for THEIR OWN
threshold (core/exits.py) are answered at once and only the survivors go on, so no row waits for
a slower neighbour. Before each step, rows that the budget rule says cannot wait (budgets.py) are
answered from the exit they reached, and rows whose request is closed are dropped.

One worker with all the cores gives a lone request the lowest latency; on a small CPU under load,
several workers with one core each serve more (docs/serving.md has the measurements).

A worker that dies, of any exception outside an engine call, fails its rows and the queue's with
503 and tells the runtime, which turns readiness off and ends the process non-zero (supervision).
An engine call that raises fails the rows in flight with a 500 and the worker goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from typing import Callable

import numpy as np

from romebert.core.exits import confident, softmax_entropy
from romebert.core.tokenization import TokenRow
from romebert.service import budgets
from romebert.service.admission import Admission
from romebert.service.cohorts import BatchLimit, Cohort, EngineLike, form, merge_same_depth, oldest_group
from romebert.service.cost_model import CostModel
from romebert.service.metrics import Metrics
from romebert.service.policy import Policy
from romebert.service.tickets import EngineFailure, Exit, Rejected, Row, Ticket

log = logging.getLogger("romebert.scheduler")

# An idle worker starts one length group: the oldest queued row's, out of this many batches' worth
# of the queue's head. Past capacity the queue is deep, so that group is a full batch of one
# length, and the rows of other lengths wait in the queue (where admission counts them and the
# wait bound holds) rather than inside the worker behind it.
LOOKAHEAD = 4


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        admission: Admission,
        metrics: Metrics,
        cost_model: CostModel,
        *,
        policy: Policy,
        limit: BatchLimit,
        max_wait_ms: float = 0.0,
        workers: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        on_failure: Callable[[BaseException], None] = lambda err: None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be positive, not {workers}")
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.cost_model = cost_model
        self.policy = policy
        self.limit = limit  # the one the warm-up ran its shapes by
        self.max_batch = limit.max_rows
        self.max_wait = max_wait_ms / 1000
        self.clock = clock
        self.on_failure = on_failure
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"romebert-engine-{k}", daemon=True) for k in range(workers)]

    # -- the event loop's side -------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, tokens: list[TokenRow], threshold: float, budget_s: float | None, arrival: float) -> Ticket:
        """Queue every row of a request (all or none; raises Rejected); await the ticket's future.

        `arrival` is when the request reached the server (scheduler clock): queue time counts
        against the budget and against the server's wait bound.
        """
        ticket = Ticket(len(tokens), asyncio.get_running_loop())
        deadline = arrival + budget_s if budget_s is not None else math.inf
        rows = [Row(t, threshold, arrival, deadline, ticket, i) for i, t in enumerate(tokens)]
        self.admission.admit(rows, budget_s)
        return ticket

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to stop (after the admission closed); True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    # -- the workers -----------------------------------------------------------------------
    def _run(self) -> None:
        cohorts: list[Cohort] = []
        try:
            while (fresh := self._admit(cohorts)) is not None:
                try:
                    cohorts = self._advance(cohorts, fresh)
                except Exception as err:  # noqa: BLE001 - a failed engine call must not stop the server
                    log.exception("engine failure")
                    error = EngineFailure(f"engine failure: {type(err).__name__}: {err}")
                    self._drop_all(fresh, cohorts, lambda row: row.ticket.fail(error, "error"))
                    cohorts = []
        except BaseException as err:  # the worker itself broke: nobody will run its rows or the queue's
            log.critical("worker %s died", threading.current_thread().name, exc_info=err)
            error = Rejected("worker_failed", f"a worker of this server died ({type(err).__name__}); it is restarting")
            self._drop_all([], cohorts, lambda row: row.ticket.fail(error, "worker_failed"))
            self.admission.fail_all(error, "worker_failed")
            self.on_failure(err)

    def _drop_all(self, fresh: list[Row], cohorts: list[Cohort], fail: Callable[[Row], object]) -> None:
        rows = fresh + [row for c in cohorts for row in c.rows]
        for row in rows:
            fail(row)
        self.admission.release(len(rows))

    def _admit(self, cohorts: list[Cohort]) -> list[Row] | None:
        """Rows to start now ([] for none); None when closed and all work is done."""
        if not cohorts:
            if not self.admission.wait_for_rows(self.max_batch, self.max_wait):
                return None
            return self.admission.take(LOOKAHEAD * self.max_batch, lambda rows: oldest_group(rows, self.limit))
        rows = self.admission.take_urgent(
            lambda: self.clock() + budgets.busy_time(cohorts, self.cost_model, self.engine.num_layers), self.max_batch)
        if self.policy.regroup:
            rows += self.admission.take(self.max_batch - sum(len(c.rows) for c in cohorts) - len(rows))
        return rows

    def _advance(self, cohorts: list[Cohort], fresh: list[Row]) -> list[Cohort]:
        """Form the fresh rows into cohorts, then run one layer for the policy's choice."""
        started = time.perf_counter()  # the service rate counts forming too: it runs the embedding
        cohorts = cohorts + form(fresh, self.engine, self._order, self.limit) if fresh else cohorts
        if self.policy.regroup:
            cohorts = merge_same_depth(cohorts, self.engine, self.limit)
        if not cohorts:
            return cohorts
        left = sum(self._drop_closed(c) for c in cohorts)
        cohorts = [c for c in cohorts if c.rows]  # a cohort whose rows all left has nothing to run or cut
        chosen = self.policy.next(cohorts) if cohorts else None
        if chosen is not None and chosen.depth == 0:
            self._drop_expired(chosen)
        stepped = False
        if chosen is not None and chosen.rows:
            for cohort, mask in budgets.late_rows(cohorts, chosen, self.cost_model, self.clock()):
                left += self._answer(cohort, mask, budget_exhausted=True)
            if stepped := bool(chosen.rows):
                left += self._step(chosen)
        self.admission.done(left, time.perf_counter() - started, stepped)
        return [c for c in cohorts if c.rows]

    def _drop_closed(self, cohort: Cohort) -> int:
        """Drop the rows whose request is closed (the client left): no more work for them."""
        if not any(row.ticket.closed for row in cohort.rows):  # the usual case, told without an array
            return 0
        closed = np.fromiter((row.ticket.closed for row in cohort.rows), dtype=bool, count=len(cohort.rows))
        for row in (cohort.rows[i] for i in np.flatnonzero(closed)):
            self.metrics.shed_rows.labels(row.ticket.closed_because or "cancelled").inc()
        cohort.keep(self.engine, ~closed)
        return int(closed.sum())

    def _drop_expired(self, cohort: Cohort) -> None:
        """Before a cohort's first layer: drop the rows that have waited past the queue-wait bound."""
        late = self.admission.expire(cohort.rows)
        if late.any():
            cohort.keep(self.engine, ~late)

    def _step(self, cohort: Cohort) -> int:
        """Run the cohort's next layer; answer the rows that leave after it; return how many left."""
        rows, width, mask = len(cohort.rows), cohort.width, cohort.state.attention_mask
        started = time.perf_counter()
        cohort.state, cohort.logits = self.engine.layer(cohort.depth, cohort.state)
        self.cost_model.observe(cohort.depth, rows, width, time.perf_counter() - started)
        self.metrics.layer_ran(rows, mask)
        cohort.depth += 1
        last = cohort.depth == self.engine.num_layers
        if not last and not cohort.may_leave_early:
            return 0
        exits = softmax_entropy(cohort.logits)
        leave = np.ones(rows, dtype=bool) if last else confident(exits[1], cohort.thresholds)
        return self._answer(cohort, leave, budget_exhausted=False, exits=exits)

    def _answer(self, cohort: Cohort, leave: np.ndarray, budget_exhausted: bool,
                exits: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """Answer the rows flagged in `leave` from the cohort's current exit; keep the others.
        `exits`: the cohort's (probabilities, entropies) at that exit, when the step has them."""
        leaving = np.flatnonzero(leave)
        if not len(leaving):
            return 0
        now = self.clock()
        probabilities, entropies = exits if exits is not None else softmax_entropy(cohort.logits)
        for i in leaving.tolist():
            row = cohort.rows[i]
            self.metrics.answered(cohort.depth, budget_exhausted)
            row.ticket.answer(row.index, Exit(cohort.logits[i], probabilities[i], cohort.depth, float(entropies[i]), budget_exhausted, now - row.arrival))
        cohort.keep(self.engine, ~leave)
        return len(leaving)
