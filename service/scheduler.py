"""The batching scheduler: a bounded queue in front of the engine's worker threads, with per-row early exit.

The asyncio loop only enqueues and awaits; worker threads run the engine (onnxruntime releases
the GIL, so HTTP keeps being served while a layer runs). Each worker takes rows from the one
queue and keeps its own set of cohorts, rows that sit at the same depth and share hidden states.
One worker with all the cores gives a lone request the lowest latency; on a small CPU under load,
several workers with one core each serve more (one intra-op pool split over two cores loses over
a quarter of its speed whenever HTTP takes a slice of a core, and parallelises small batches
poorly; docs/serving.md has the measurements). Each step runs ONE layer for ONE cohort; after it,
the rows whose exit entropy is strictly below their own threshold are answered at once and only
the survivors go on, so no row waits for a slower neighbour.

Policy "complete" (the default): a batch runs to its end, still shedding confident rows after
every layer, before the next is formed from whatever queued meanwhile. Policy "regroup": at every
layer boundary newly queued rows are admitted as fresh cohorts (grouped by length, embedded),
cohorts at the same depth are merged (zero padding along the sequence axis is exact for BERT, see
Engine.merge), and the next step goes to a fresh cohort if there is one, else to the deepest
(admission stops while max_batch rows are in flight, so nothing starves). Fresh first gives a
newcomer its exit-1 chance without waiting out the stragglers of an earlier batch, which cuts the
median of easy requests at moderate load; but the long jobs pay in tail latency and the extra
steps and merges cost capacity, so on the measured CPU "complete" serves more and has the better
p99 (docs/serving.md has the measurements).

Latency budgets are kept by prediction, as deadlines: layer 1 always runs; after it, before every
step, each row whose remaining budget will not cover its next layer (plus, for rows outside the
cohort about to run, that step) is answered from the deepest exit reached, flagged
budget_exhausted. Under "complete", a budgeted row that would run out of time waiting for the
batch in flight joins at the next layer boundary, ahead of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from romebert.service.cost_model import CostModel, EwmaCostModel
from romebert.core.engine import HiddenBatch
from romebert.core.exits import can_leave_early, entropy
from romebert.service.metrics import Metrics
from romebert.service.settings import POLICIES
from romebert.core.tokenization import Encoded

log = logging.getLogger("romebert.scheduler")

# Rows are grouped (and cohorts merged) only while the padded batch holds at most this many
# token slots per real token, or is no wider than SMALL_WIDTH: below that width a separate engine
# call costs more than the padding it saves.
PAD_SLACK = 1.5
SMALL_WIDTH = 16


class EngineLike(Protocol):
    num_layers: int

    def embed(self, batch: Encoded) -> HiddenBatch: ...
    def layer(self, i: int, state: HiddenBatch) -> tuple[HiddenBatch, np.ndarray]: ...
    def keep(self, state: HiddenBatch, rows: np.ndarray) -> HiddenBatch: ...
    def merge(self, states: list[HiddenBatch]) -> HiddenBatch: ...


class QueueFull(Exception):
    """The queue cannot take these rows now; the client should retry later."""


class SchedulerClosed(Exception):
    """The server is shutting down and takes no new work."""


class EngineFailure(RuntimeError):
    """The engine raised while these rows were in flight (logged with its traceback)."""


@dataclass(frozen=True)
class Exit:
    """The answer for one row: the logits of the exit it left at, and why it left there."""

    logits: np.ndarray  # (C,)
    exit_layer: int  # 1-based; also the number of layers run for the row
    entropy: float
    budget_exhausted: bool
    latency_s: float  # from arrival to answer, on the scheduler's clock


@dataclass(eq=False)
class _Item:
    input_ids: np.ndarray  # (length,)
    token_type_ids: np.ndarray
    threshold: float
    arrival: float  # scheduler clock
    deadline: float  # scheduler clock; inf without a budget
    enqueued: float  # time.monotonic(), for the batching window
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(eq=False)
class _Cohort:
    items: list[_Item]
    state: HiddenBatch
    order: int  # admission order, to break ties oldest first
    depth: int = 0  # layers run so far
    logits: np.ndarray | None = None  # (rows, C) of exit `depth`

    @property
    def width(self) -> int:
        return self.state.attention_mask.shape[1]

    @property
    def deadline(self) -> float:
        """The earliest deadline of its rows (inf when none has a budget)."""
        return min(it.deadline for it in self.items)


def _fits(rows: int, width: int, tokens: int) -> bool:
    return width <= SMALL_WIDTH or rows * width <= PAD_SLACK * tokens


def length_groups(items: list[_Item]) -> list[list[_Item]]:
    """Split rows into groups of similar length so that padding stays small (see PAD_SLACK)."""
    groups: list[list[_Item]] = []
    for item in sorted(items, key=lambda it: it.length):
        group = groups[-1] if groups else None
        if group and _fits(len(group) + 1, item.length, sum(it.length for it in group) + item.length):
            group.append(item)
        else:
            groups.append([item])
    return groups


def _pad_batch(items: list[_Item]) -> Encoded:
    lengths = np.array([it.length for it in items], dtype=np.int64)
    width = int(lengths.max())
    ids = np.zeros((len(items), width), dtype=np.int64)
    types = np.zeros_like(ids)
    for row, it in enumerate(items):
        ids[row, : it.length] = it.input_ids
        types[row, : it.length] = it.token_type_ids
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return Encoded(ids, mask, types, np.zeros(len(items), dtype=bool), lengths)


def _settle(future: asyncio.Future, result: Exit | BaseException) -> None:
    if future.done():  # the request was cancelled (client gone): nobody waits for this answer
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        policy: str = "complete",
        workers: int = 1,
        cost_model: CostModel | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if workers < 1:
            raise ValueError(f"workers must be positive, not {workers}")
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.policy = policy
        self.cost_model = cost_model or EwmaCostModel(engine.num_layers)
        self.clock = clock
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"romebert-engine-{k}", daemon=True) for k in range(workers)]

    # -- the asyncio side ------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, batch: Encoded, threshold: float, budget_s: float | None, arrival: float) -> list[asyncio.Future]:
        """Queue every row of `batch` (all or none); call from the event loop, await the futures.

        `arrival` is when the request reached the server (scheduler clock): queue time counts
        against the budget.
        """
        loop = asyncio.get_running_loop()
        deadline = arrival + budget_s if budget_s is not None else math.inf
        items = [
            _Item(batch.input_ids[r, :n], batch.token_type_ids[r, :n], threshold, arrival, deadline, time.monotonic(), loop.create_future(), loop)
            for r, n in enumerate(batch.lengths.tolist())
        ]
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} items queued, room for {self.max_queue - len(self._queue)}")
            self._queue.extend(items)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()  # an idle worker may be waiting while another sits in its batching window
        return [it.future for it in items]

    def close(self) -> None:
        """Take no new work; the worker finishes what is queued and in flight, then stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to stop (after close()); True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    # -- the engine threads ----------------------------------------------------------------
    def _run(self) -> None:
        """One worker: admit rows, run one layer for one of its cohorts, repeat until closed."""
        cohorts: list[_Cohort] = []
        while (fresh := self._take(cohorts)) is not None:
            try:
                cohorts += [_Cohort(g, self.engine.embed(_pad_batch(g)), next(self._order)) for g in length_groups(fresh)]
                if self.policy == "regroup":
                    cohorts = self._merged(cohorts)
                if cohorts:
                    cohort = self._next(cohorts)
                    self._cut_late(cohorts, cohort)
                    if cohort.items:
                        self._step(cohort)
                    cohorts = [c for c in cohorts if c.items]
            except Exception as err:  # noqa: BLE001 - a failed engine call must not stop the server
                # Fail every row in flight (a 500 for their requests): none is left unanswered, and
                # the engine starts clean. Rows already answered are not touched (see _settle).
                log.exception("engine failure")
                for item in fresh + [it for c in cohorts for it in c.items]:
                    self._resolve(item, EngineFailure(f"engine failure: {type(err).__name__}: {err}"))
                cohorts = []

    def _take(self, cohorts: list[_Cohort]) -> list[_Item] | None:
        """Rows to admit now: [] when none may join, None when closed and all work is done."""
        with self._cond:
            if not cohorts:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                # Idle: give the batch until max_wait after its first row arrived to fill up.
                window_end = self._queue[0].enqueued + self.max_wait
                while len(self._queue) < self.max_batch and not self._closed:
                    remaining = window_end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            # Mid-flight, rows whose budget cannot wait join at once; under regroup the others join
            # too while fewer than max_batch rows are in flight.
            taken = self._take_urgent(cohorts) if cohorts else []
            if not cohorts or self.policy == "regroup":
                room = self.max_batch - sum(len(c.items) for c in cohorts) - len(taken)
                taken += [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            self.metrics.queue_depth.set(len(self._queue))
        now = self.clock()
        for item in taken:
            self.metrics.queue_wait.observe(max(now - item.arrival, 0.0))
        return taken

    def _take_urgent(self, cohorts: list[_Cohort]) -> list[_Item]:
        """The queued rows whose budget would run out before the cohorts in flight end (predicted as
        if no row left early), at most max_batch; call with the lock held."""
        budgeted = [it for it in self._queue if it.deadline < math.inf]
        if not budgeted:
            return []
        now = self.clock()
        busy = sum(self.cost_model.predict(d, len(c.items), c.width) for c in cohorts for d in range(c.depth, self.engine.num_layers))
        urgent = [it for it in budgeted if it.deadline - now < busy][: self.max_batch]
        if urgent:
            chosen = set(map(id, urgent))
            self._queue = deque(it for it in self._queue if id(it) not in chosen)
        return urgent

    def _merged(self, cohorts: list[_Cohort]) -> list[_Cohort]:
        """Merge cohorts at the same depth while the result stays within max_batch and PAD_SLACK."""
        out: list[_Cohort] = []
        by_depth = itertools.groupby(sorted(cohorts, key=lambda c: (c.depth, c.width)), key=lambda c: c.depth)
        for _, same_depth in by_depth:
            runs: list[list[_Cohort]] = []
            for cohort in same_depth:
                run = runs[-1] if runs else None
                rows = sum(len(c.items) for c in run or []) + len(cohort.items)
                tokens = sum(it.length for c in (run or []) + [cohort] for it in c.items)
                if run and rows <= self.max_batch and _fits(rows, cohort.width, tokens):
                    run.append(cohort)
                else:
                    runs.append([cohort])
            out += [run[0] if len(run) == 1 else self._merge(run) for run in runs]
        return out

    def _merge(self, run: list[_Cohort]) -> _Cohort:
        logits = None if run[0].logits is None else np.concatenate([c.logits for c in run])
        state = self.engine.merge([c.state for c in run])
        return _Cohort([it for c in run for it in c.items], state, min(c.order for c in run), run[0].depth, logits)

    def _next(self, cohorts: list[_Cohort]) -> _Cohort:
        """Fresh cohorts with a budget first (their rows may have been let in because they could not
        wait); then regroup: the other fresh ones, then the deepest; complete: the deepest. Ties:
        oldest first."""

        def rank(c: _Cohort) -> tuple:
            fresh = c.depth == 0
            return (not (fresh and c.deadline < math.inf), self.policy == "regroup" and not fresh, -c.depth, c.order)

        return min(cohorts, key=rank)

    def _cut_late(self, cohorts: list[_Cohort], chosen: _Cohort) -> None:
        """Answer now (budget_exhausted) every row past layer 1 whose remaining budget will not
        cover its next layer: for the chosen cohort that layer comes next, for the others only
        after the chosen cohort's step, so a row is not left waiting past its deadline."""
        now = self.clock()
        if chosen.depth > 0 and chosen.deadline < math.inf:
            self._cut(chosen, now, self.cost_model.predict(chosen.depth, len(chosen.items), chosen.width))
        if not chosen.items:
            return
        step = self.cost_model.predict(chosen.depth, len(chosen.items), chosen.width)
        for cohort in cohorts:
            if cohort is not chosen and cohort.depth > 0 and cohort.deadline < math.inf:
                self._cut(cohort, now, step + self.cost_model.predict(cohort.depth, len(cohort.items), cohort.width))

    def _cut(self, cohort: _Cohort, now: float, needed: float) -> None:
        self._answer(cohort, np.array([it.deadline - now < needed for it in cohort.items]), budget_exhausted=True)

    def _step(self, cohort: _Cohort) -> None:
        """Run the cohort's next layer; answer the rows that leave after it."""
        rows, width = len(cohort.items), cohort.width
        started = time.perf_counter()
        cohort.state, cohort.logits = self.engine.layer(cohort.depth, cohort.state)
        self.cost_model.observe(cohort.depth, rows, width, time.perf_counter() - started)
        self.metrics.batch_size.observe(rows)
        cohort.depth += 1
        last = cohort.depth == self.engine.num_layers
        thresholds = np.array([it.threshold for it in cohort.items])
        if not last and not can_leave_early(thresholds):
            return
        entropies = entropy(cohort.logits)
        leave = np.ones(rows, dtype=bool) if last else entropies < thresholds
        self._answer(cohort, leave, budget_exhausted=False, entropies=entropies)

    def _answer(self, cohort: _Cohort, leave: np.ndarray, budget_exhausted: bool, entropies: np.ndarray | None = None) -> None:
        """Answer the rows flagged in `leave` from the cohort's current exit; keep the others.

        `entropies` of the current exit's logits, when the caller has them already.
        """
        if not leave.any():
            return
        now = self.clock()
        if entropies is None:
            entropies = entropy(cohort.logits)
        for row in np.flatnonzero(leave):
            item = cohort.items[row]
            self.metrics.answered(cohort.depth, budget_exhausted)
            answer = Exit(cohort.logits[row], cohort.depth, float(entropies[row]), budget_exhausted, now - item.arrival)
            self._resolve(item, answer)
        stay = np.flatnonzero(~leave)
        cohort.items = [cohort.items[row] for row in stay]
        if len(stay):
            cohort.state = self.engine.keep(cohort.state, stay)
            cohort.logits = cohort.logits[stay]

    @staticmethod
    def _resolve(item: _Item, result: Exit | BaseException) -> None:
        try:
            item.loop.call_soon_threadsafe(_settle, item.future, result)
        except RuntimeError:  # the loop is closed: the process is going away
            pass
