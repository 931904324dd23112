"""The serving layer: per-row exits, budgets, policies, admission, gone clients, supervision, drain.

Most tests drive a fake engine whose exit logits are fixed per row, so which row leaves at which
layer, and which rows the engine ran together, are known exactly. The last tests run the real
tiny bundle to check that merging cohorts (zero padding along the sequence axis) is exact.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from fixed_cost import FixedCost
from romebert.core.engine import HiddenBatch
from romebert.core.exits import entropy, exit_layers
from romebert.core.tokenization import Encoded, TokenRow, pad
from romebert.service.admission import Admission
from romebert.service.cohorts import PAD_SLACK, SMALL_WIDTH, BatchLimit, length_groups
from romebert.service.cost_model import EwmaCostModel
from romebert.service.metrics import Metrics
from romebert.service.policy import POLICIES
from romebert.service.scheduler import Scheduler
from romebert.service.tickets import EngineFailure, Rejected, Row, Ticket

SURE = [6.0, -6.0]  # entropy ~ 0.0001 nats
MID = [1.0, -1.0]  # entropy ~ 0.36
UNSURE = [0.0, 0.0]  # entropy ln 2
# Each row's first token is a code that fixes its exit logits at layers 1, 2 and 3.
PLAN = {
    1: [SURE, SURE, SURE],
    2: [UNSURE, MID, SURE],
    3: [UNSURE, UNSURE, UNSURE],
    4: [MID, UNSURE, SURE],
}


class FakeEngine:
    """The Engine interface in numpy. The hidden state carries each row's code; `calls` records
    (layer, codes) for every layer call. With `stepping`, each layer call waits for step()."""

    num_layers = 3

    def __init__(self, stepping: bool = False, fail_on_layer: int | None = None):
        self.calls: list[tuple[int, list[int]]] = []
        self.stepping = stepping
        self.fail_on_layer = fail_on_layer
        self._steps = threading.Semaphore(0)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self._steps.release()

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width

    def embed(self, batch: Encoded) -> HiddenBatch:
        return HiddenBatch(batch.input_ids[:, :, None].astype(np.float32), batch.attention_mask)

    def layer(self, i: int, state: HiddenBatch) -> tuple[HiddenBatch, np.ndarray]:
        codes = [int(c) for c in state.hidden[:, 0, 0]]
        self.calls.append((i, codes))
        if self.stepping:
            assert self._steps.acquire(timeout=10), "test never stepped the engine"
        if i == self.fail_on_layer:
            raise RuntimeError("device lost")
        return state, np.array([PLAN[c][i] for c in codes], dtype=np.float32)

    def keep(self, state: HiddenBatch, rows: np.ndarray) -> HiddenBatch:
        return HiddenBatch(state.hidden[rows], state.attention_mask[rows])

    def merge(self, states: list[HiddenBatch]) -> HiddenBatch:
        width = max(s.attention_mask.shape[1] for s in states)
        padding = [((0, 0), (0, width - s.attention_mask.shape[1])) for s in states]
        return HiddenBatch(
            np.concatenate([np.pad(s.hidden, p + ((0, 0),)) for s, p in zip(states, padding)]),
            np.concatenate([np.pad(s.attention_mask, p) for s, p in zip(states, padding)]),
        )


def rows(codes: list[int], length: int = 5) -> list[TokenRow]:
    return [TokenRow(np.full(length, c, dtype=np.int64), np.zeros(length, dtype=np.int64), False) for c in codes]


def make(engine=None, *, max_queue: int = 64, max_queue_wait_s: float = 60.0, seconds_per_row: float = 0.0,
         policy: str = "complete", cost_model=None, clock=time.perf_counter, workers: int = 1, max_batch: int = 8,
         max_batch_tokens: float = math.inf, **kwargs) -> tuple[Scheduler, FakeEngine]:
    engine = engine or FakeEngine()
    metrics = Metrics(engine.num_layers)
    admission = Admission(metrics, max_queue=max_queue, max_queue_wait_s=max_queue_wait_s, workers=workers,
                          seconds_per_row=seconds_per_row, clock=clock)
    options = dict(max_wait_ms=20.0) | kwargs
    scheduler = Scheduler(engine, admission, metrics, cost_model or EwmaCostModel(engine.num_layers), policy=POLICIES[policy],
                          limit=BatchLimit(max_batch, max_batch_tokens, engine.padded_shape), workers=workers, clock=clock, **options)
    scheduler.failures = []
    scheduler.on_failure = scheduler.failures.append
    scheduler.start()
    return scheduler, engine


def submit(scheduler: Scheduler, codes: list[int], threshold: float, budget_s: float | None = None, arrival: float | None = None, length: int = 5):
    return scheduler.submit(rows(codes, length), threshold, budget_s, scheduler.clock() if arrival is None else arrival)


async def done(*tickets) -> list:
    """Every answer of these tickets, in order."""
    return [a for answers in await asyncio.gather(*(t.future for t in tickets)) for a in answers]


async def answers(scheduler: Scheduler, codes: list[int], threshold: float, budget_s: float | None = None, arrival: float | None = None, length: int = 5):
    return await done(submit(scheduler, codes, threshold, budget_s, arrival, length))


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def expected_exit(code: int, threshold: float) -> int:
    return int(exit_layers(np.array(PLAN[code], dtype=np.float32)[:, None, :], threshold)[0])


@pytest.mark.asyncio
@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.5, 0.7])
async def test_each_row_leaves_at_its_first_exit_below_the_threshold(threshold):
    scheduler, _ = make()
    got = await answers(scheduler, [1, 2, 3, 4], threshold)
    assert [a.exit_layer for a in got] == [expected_exit(c, threshold) for c in (1, 2, 3, 4)]
    for code, a in zip((1, 2, 3, 4), got):
        assert np.allclose(a.logits, PLAN[code][a.exit_layer - 1])
        assert math.isclose(a.entropy, float(entropy(np.array(PLAN[code][a.exit_layer - 1]))), rel_tol=1e-6)
        assert not a.budget_exhausted


@pytest.mark.asyncio
async def test_threshold_zero_means_full_depth_even_for_confident_rows():
    scheduler, _ = make()
    got = await answers(scheduler, [1, 1], 0.0)
    assert [a.exit_layer for a in got] == [3, 3]


@pytest.mark.asyncio
async def test_rows_that_cannot_leave_early_are_not_tested_before_the_last_exit(monkeypatch):
    """Threshold 0 lets no row leave early, so a cohort of such rows skips the exit test until the
    last layer; once the one row of a cohort that could leave has left, so do the rest."""
    import romebert.service.scheduler as scheduler_module

    tested = []  # rows per exit test
    real = scheduler_module.softmax_entropy
    monkeypatch.setattr(scheduler_module, "softmax_entropy", lambda logits: tested.append(len(logits)) or real(logits))
    scheduler, _ = make()
    await answers(scheduler, [1, 1], 0.0)
    assert tested == [2]
    tested.clear()
    got = await done(submit(scheduler, [1], 0.5), submit(scheduler, [3, 3], 0.0))  # one cohort
    assert [a.exit_layer for a in got] == [1, 3, 3]
    assert tested == [3, 2]  # exit 1 for all three, then nothing until the last exit


@pytest.mark.asyncio
async def test_rows_leave_the_batch_and_only_survivors_run_on():
    scheduler, engine = make()
    await answers(scheduler, [1, 2, 3], 0.5)  # exits 1, 2, 3
    assert engine.calls == [(0, [1, 2, 3]), (1, [2, 3]), (2, [3])]


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", POLICIES)
async def test_rows_with_different_thresholds_in_one_batch_leave_at_their_own_layers(policy):
    scheduler, engine = make(policy=policy)
    strict = submit(scheduler, [2, 4], 0.01)
    loose = submit(scheduler, [2, 4], 0.5)
    together = await done(strict, loose)
    assert engine.calls[0] == (0, [2, 4, 2, 4])  # one batch
    assert [a.exit_layer for a in together] == [3, 3, 2, 1]

    alone, _ = make()
    for answer, (code, threshold) in zip(together, [(2, 0.01), (4, 0.01), (2, 0.5), (4, 0.5)]):
        (single,) = await answers(alone, [code], threshold)
        assert single.exit_layer == answer.exit_layer
        assert np.array_equal(single.logits, answer.logits)


@pytest.mark.asyncio
async def test_budget_too_small_for_layer_2_answers_from_exit_1():
    scheduler, _ = make(cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    (a,) = await answers(scheduler, [3], 0.0, budget_s=0.5)
    assert (a.exit_layer, a.budget_exhausted) == (1, True)
    assert np.allclose(a.logits, UNSURE)


@pytest.mark.asyncio
async def test_budget_stops_a_row_before_the_layer_that_would_overrun_it():
    scheduler, _ = make(cost_model=FixedCost([0.2, 0.2, 1.0]), clock=lambda: 100.0)
    (a,) = await answers(scheduler, [3], 0.0, budget_s=0.5)  # layer 2 fits (0.2 <= 0.5), layer 3 not
    assert (a.exit_layer, a.budget_exhausted) == (2, True)


@pytest.mark.asyncio
async def test_a_budget_that_covers_every_layer_changes_nothing():
    scheduler, _ = make(cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    (a,) = await answers(scheduler, [3], 0.0, budget_s=1.0)
    assert (a.exit_layer, a.budget_exhausted) == (3, False)


@pytest.mark.asyncio
async def test_queue_time_counts_against_the_budget():
    scheduler, _ = make(cost_model=FixedCost([0.1, 0.1, 0.1]), clock=lambda: 100.0)
    (a,) = await answers(scheduler, [3], 0.0, budget_s=0.5, arrival=99.55)  # 0.05 s left at layer 2
    assert (a.exit_layer, a.budget_exhausted) == (1, True)


@pytest.mark.asyncio
async def test_layer_1_always_runs_however_small_the_budget():
    scheduler, engine = make(cost_model=FixedCost([9.0, 9.0, 9.0]), clock=lambda: 100.0)
    (a,) = await answers(scheduler, [3], 0.0, budget_s=1e-6, arrival=99.9)
    assert (a.exit_layer, a.budget_exhausted) == (1, True)
    assert engine.calls == [(0, [3])]


@pytest.mark.asyncio
async def test_a_confident_row_is_not_flagged_budget_exhausted_and_each_answer_keeps_its_own_logits():
    scheduler, _ = make(cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    sure, unsure = await answers(scheduler, [1, 3], 0.1, budget_s=0.5)
    assert (sure.exit_layer, sure.budget_exhausted) == (1, False)
    assert (unsure.exit_layer, unsure.budget_exhausted) == (1, True)
    # the unsure row is cut after its confident neighbour left the batch: its own exit's logits
    assert (sure.logits.tolist(), unsure.logits.tolist()) == (SURE, UNSURE)


@pytest.mark.asyncio
async def test_under_complete_a_budgeted_row_that_cannot_wait_for_the_batch_joins_at_the_next_layer():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="complete",
                             cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    batch = submit(scheduler, [3, 3], 0.0, None, 100.0)
    await wait_for(lambda: len(engine.calls) == 1)  # layer 1 of the batch runs; 2 s of it are left after
    patient = submit(scheduler, [3], 0.0, 10.0, 100.0)  # can wait for the batch
    urgent = submit(scheduler, [3], 0.0, 1.5, 100.0)  # cannot
    engine.step(20)
    got = await done(batch, patient, urgent)
    # The urgent row runs its layer 1 at the next boundary, then is answered before it would have
    # to wait out the batch's next layer and its own; the patient row waits for the batch.
    assert engine.calls == [(0, [3, 3]), (0, [3]), (1, [3, 3]), (2, [3, 3]), (0, [3]), (1, [3]), (2, [3])]
    assert [(a.exit_layer, a.budget_exhausted) for a in got] == [(3, False), (3, False), (3, False), (1, True)]


@pytest.mark.asyncio
async def test_under_regroup_a_row_that_cannot_wait_gets_in_even_when_max_batch_rows_are_in_flight():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="regroup", max_batch=1,
                             cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    first = submit(scheduler, [3], 0.0, None, 100.0)
    await wait_for(lambda: len(engine.calls) == 1)
    patient = submit(scheduler, [3], 0.0, None, 100.0)  # no budget: waits for room
    urgent = submit(scheduler, [3], 0.0, 1.5, 100.0)
    engine.step(20)
    got = await done(first, patient, urgent)
    assert engine.calls == [(0, [3]), (0, [3]), (1, [3]), (2, [3]), (0, [3]), (1, [3]), (2, [3])]
    assert [(a.exit_layer, a.budget_exhausted) for a in got] == [(3, False), (3, False), (1, True)]


@pytest.mark.asyncio
async def test_a_row_is_answered_when_waiting_for_another_cohort_would_overrun_its_budget():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="regroup",
                             cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    budgeted = submit(scheduler, [3], 0.0, 1.5, 100.0)
    await wait_for(lambda: len(engine.calls) == 1)
    newcomer = submit(scheduler, [3], 0.0, None, 100.0, length=4)
    engine.step(20)
    (a,), (b,) = await done(budgeted), await done(newcomer)
    # Layer 2 alone (1 s) would fit its 1.5 s, but the newcomer's layer 1 runs first (1 s).
    assert (a.exit_layer, a.budget_exhausted) == (1, True)
    assert engine.calls == [(0, [3]), (0, [3]), (1, [3]), (2, [3])]
    assert (b.exit_layer, b.budget_exhausted) == (3, False)


@pytest.mark.asyncio
async def test_a_budgeted_row_waiting_for_its_first_layer_behind_another_is_never_cut_before_it():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="regroup",
                             cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    blocker = submit(scheduler, [3], 0.0, None, 100.0)
    await wait_for(lambda: len(engine.calls) == 1)
    # Two fresh cohorts (lengths too far apart to share one): the shorter runs first, and the
    # other's 1.8 s will not cover that step and its own layer 1, yet layer 1 always runs.
    first = submit(scheduler, [3], 0.0, 1.5, 100.0, length=5)
    second = submit(scheduler, [3], 0.0, 1.8, 100.0, length=40)
    engine.step(20)
    got = await done(blocker, first, second)
    assert [(a.exit_layer, a.budget_exhausted) for a in got] == [(3, False), (1, True), (1, True)]
    # the first is cut from the cohort it merged into at depth 1: its answer carries its exit's logits
    assert [a.logits.tolist() for a in got] == [UNSURE] * 3
    assert [layer for layer, _ in engine.calls].count(0) == 3


@pytest.mark.asyncio
async def test_regroup_admits_arrivals_at_a_layer_boundary_and_merges_cohorts_at_the_same_depth():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="regroup")
    first = submit(scheduler, [3, 3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)  # layer 1 of the first batch is running
    second = submit(scheduler, [3], 0.0, length=4)
    engine.step(5)
    await done(first, second)
    # The newcomer runs its layer 1 at the next boundary (fresh first), then both cohorts sit at
    # depth 1 and go on as one batch.
    assert engine.calls == [(0, [3, 3]), (0, [3]), (1, [3, 3, 3]), (2, [3, 3, 3])]


@pytest.mark.asyncio
async def test_complete_policy_runs_a_batch_to_its_end_before_the_next():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="complete")
    first = submit(scheduler, [3, 3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    second = submit(scheduler, [3], 0.0)
    engine.step(6)
    await done(first, second)
    assert engine.calls == [(0, [3, 3]), (1, [3, 3]), (2, [3, 3]), (0, [3]), (1, [3]), (2, [3])]


@pytest.mark.asyncio
async def test_a_batch_waits_up_to_max_wait_ms_after_its_first_row_for_more():
    scheduler, engine = make(max_batch=2, max_wait_ms=500.0)
    first = submit(scheduler, [3], 0.0)
    await asyncio.sleep(0.05)
    second = submit(scheduler, [1], 0.0)
    await done(first, second)
    assert engine.calls[0] == (0, [3, 1])


@pytest.mark.asyncio
async def test_a_full_batch_does_not_wait_out_the_window():
    scheduler, engine = make(max_batch=2, max_wait_ms=60_000.0)
    answered = await asyncio.wait_for(done(submit(scheduler, [3, 1], 0.5)), timeout=10)
    assert [a.exit_layer for a in answered] == [3, 1] and engine.calls[0] == (0, [3, 1])


@pytest.mark.asyncio
async def test_rows_of_very_different_lengths_are_not_padded_into_one_batch():
    scheduler, engine = make()
    short = submit(scheduler, [3], 0.0, length=20)
    long = submit(scheduler, [1], 0.0, length=200)
    await done(short, long)
    assert all(len(codes) == 1 for _, codes in engine.calls)


def in_fours(rows: int, width: int) -> tuple[int, int]:
    """A bucketing engine's padded shape: rows up to a multiple of 4."""
    return -(-rows // 4) * 4, width


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.sampled_from([math.inf, 64, 600, 2048]),
       st.sampled_from([1.0, PAD_SLACK, 1.5, 3.0]))
@example([1, SMALL_WIDTH], math.inf, 1.0).via("at the small width, padding is free")
@example([20, 60], math.inf, 1.5).via("padding exactly at the slack: 2 x 60 = 1.5 x 80")
@example([20, 30], math.inf, 1.2).via("padding exactly at the slack: 2 x 30 = 1.2 x 50")
@example([10] * 12, 64, PAD_SLACK).via("the token limit, not padding, ends a group of equal rows: 4 rows pad to 4 x 10 < 64 < 8 x 10")
@example([300], 64, PAD_SLACK).via("one row wider than the token limit still forms a group")
def test_length_groups_grow_while_their_padding_stays_within_the_slack_and_the_batch_limit_and_no_longer(lengths, max_tokens, slack):
    fresh = [Row(token_row, 0.0, 0.0, math.inf, None, i) for i, token_row in enumerate(  # grouping reads lengths only
        TokenRow(np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64), False) for n in lengths)]
    groups = length_groups(fresh, BatchLimit(16, max_tokens, in_fours, slack))
    sizes = [[len(row) for row in group] for group in groups]
    assert sorted(n for group in sizes for n in group) == sorted(lengths)  # every row once
    assert [n for group in sizes for n in group] == sorted(lengths)  # groups of neighbours in length

    def fits(group: list[int]) -> bool:
        padded_rows = in_fours(len(group), max(group))[0]
        within_limit = len(group) == 1 or (len(group) <= 16 and padded_rows * max(group) <= max_tokens)
        return within_limit and (max(group) <= SMALL_WIDTH or len(group) * max(group) <= slack * sum(group))

    assert all(fits(group) for group in sizes)
    # a group ends only where its next row would break the rule
    assert not any(fits(group + [following[0]]) for group, following in zip(sizes, sizes[1:]))


@pytest.mark.asyncio
async def test_a_full_queue_refuses_the_whole_request():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_queue=2, max_wait_ms=0.0)
    running = submit(scheduler, [1], 0.5)
    await wait_for(lambda: len(engine.calls) == 1)  # taken by the engine: the queue is empty again
    queued = submit(scheduler, [1], 0.5)
    with pytest.raises(Rejected, match=r"the queue is full \(1 rows, room for 1\)") as refused:
        submit(scheduler, [1, 1], 0.5)  # 1 queued + 2 > 2
    assert refused.value.retry_after == "1"  # the predicted wait is 0 here (no service rate measured): still at least a second
    fills = submit(scheduler, [1], 0.5)  # 1 queued + 1 = 2: exactly full is not over
    engine.step(3)
    assert len(await done(running, queued, fills)) == 3


@pytest.mark.asyncio
async def test_close_finishes_every_row_taken_and_refuses_new_ones():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0)
    in_flight = submit(scheduler, [3], 0.0)
    queued = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    scheduler.admission.close()
    with pytest.raises(Rejected, match="shutting down"):
        submit(scheduler, [3], 0.0)
    engine.step(6)
    assert [a.exit_layer for a in await done(in_flight, queued)] == [3, 3]
    assert scheduler.join(timeout=5)


@pytest.mark.asyncio
async def test_two_workers_run_two_batches_at_once_and_each_row_keeps_its_exit():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, workers=2)
    first = submit(scheduler, [3], 0.0)
    second = submit(scheduler, [4], 0.5)
    await wait_for(lambda: len(engine.calls) == 2)  # one worker alone would be stuck in its first call
    assert sorted(codes for _, codes in engine.calls) == [[3], [4]]
    engine.step(4)  # row 3: three layers; row 4: one
    assert [a.exit_layer for a in await done(first, second)] == [3, 1]
    scheduler.admission.close()
    assert scheduler.join(timeout=5)


@pytest.mark.asyncio
async def test_an_engine_failure_fails_the_rows_in_flight_and_the_scheduler_goes_on():
    scheduler, engine = make(FakeEngine(fail_on_layer=1))
    with pytest.raises(EngineFailure, match="device lost"):
        await answers(scheduler, [3], 0.0)
    engine.fail_on_layer = None
    (a,) = await answers(scheduler, [3], 0.0)
    assert a.exit_layer == 3


@pytest.mark.asyncio
async def test_rows_failed_by_the_engine_leave_the_service_rate_as_it_was():
    """Failed rows were not served: counting them as rows done in no time would make admission
    predict shorter waits after every engine failure."""
    scheduler, _ = make(FakeEngine(fail_on_layer=0), seconds_per_row=0.01, max_queue=128)
    admission = scheduler.admission
    admission.rate.seconds_per_step = 0.05
    tickets = [submit(scheduler, [3], 0.0) for _ in range(2 * admission.rate.window)]  # enough rows to close a window
    for outcome in await asyncio.gather(*(t.future for t in tickets), return_exceptions=True):
        assert isinstance(outcome, EngineFailure)
    await wait_for(lambda: admission.predicted_wait() == 0.0)  # the last rows leave the in-flight count
    assert (admission.rate.seconds_per_row, admission.rate.seconds_per_step) == (0.01, 0.05)


@pytest.mark.asyncio
async def test_metrics_count_every_answer_with_its_exit_layer():
    scheduler, _ = make(cost_model=FixedCost([1.0, 1.0, 1.0]), clock=lambda: 100.0)
    got = await answers(scheduler, [1, 2, 3, 4], 0.1) + await answers(scheduler, [3], 0.0, budget_s=0.5)
    m = scheduler.metrics
    layers = [a.exit_layer for a in got]
    assert m.registry.get_sample_value("romebert_exit_layer_count") == len(got)
    assert m.registry.get_sample_value("romebert_exit_layer_sum") == sum(layers)
    assert m.registry.get_sample_value("romebert_layers_executed_total") == sum(layers)
    assert m.registry.get_sample_value("romebert_budget_exhausted_total") == 1
    assert m.registry.get_sample_value("romebert_exit_layer_bucket", {"le": "1.0"}) == layers.count(1)


# -- admission, gone clients, supervision, drain ---------------------------------------------------


class Clock:
    """A scheduler clock the test moves by hand."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def shed(scheduler: Scheduler, reason: str) -> float:
    return scheduler.metrics.registry.get_sample_value("romebert_shed_rows_total", {"reason": reason})


@pytest.mark.asyncio
async def test_a_request_whose_predicted_wait_exceeds_the_bound_gets_a_fast_503_with_retry_after():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, max_queue_wait_s=0.5, seconds_per_row=0.3)
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)  # in flight: half a row ahead of the next one
    queued = submit(scheduler, [3], 0.0)  # predicted wait (0 + 1/2) x 0.3 s = 0.15 s: fits
    submit(scheduler, [3], 0.0)  # (1 + 1/2) x 0.3 = 0.45 s: fits
    with pytest.raises(Rejected) as refused:
        submit(scheduler, [3], 0.0)  # (2 + 1/2) x 0.3 = 0.75 s > 0.5 s
    assert refused.value.code == "overloaded"
    assert "predicted queue wait of 750 ms exceeds the server's bound of 500 ms" in str(refused.value)
    assert refused.value.retry_after == "1"
    assert scheduler.metrics.registry.get_sample_value("romebert_rejected_requests_total", {"reason": "predicted_wait"}) == 1
    engine.step(9)
    assert len(await done(running, queued)) == 2


@pytest.mark.asyncio
async def test_the_predicted_wait_is_shared_out_over_the_workers():
    scheduler, engine = make(FakeEngine(stepping=True), workers=2, max_batch=1, max_wait_ms=0.0, max_queue_wait_s=0.5, seconds_per_row=0.3)
    running = [submit(scheduler, [3], 0.0) for _ in range(2)]
    await wait_for(lambda: len(engine.calls) == 2)  # one row in flight on each worker
    queued = [submit(scheduler, [3], 0.0) for _ in range(3)]  # (0, 1, 2 queued + 2/2 in flight) x 0.3 s / 2: 0.15, 0.3, 0.45 s
    with pytest.raises(Rejected, match="predicted queue wait of 600 ms"):
        submit(scheduler, [3], 0.0)  # (3 + 2/2) x 0.3 s / 2 workers = 0.6 s > 0.5 s
    engine.step(3 * 5)
    assert len(await done(*running, *queued)) == 5


class SlowEmbedding(FakeEngine):
    EMBED_S = 0.05

    def embed(self, batch: Encoded) -> HiddenBatch:
        time.sleep(self.EMBED_S)
        return super().embed(batch)


@pytest.mark.asyncio
async def test_the_service_rate_counts_the_embedding_a_cohort_starts_with():
    # 32 rows, one cohort: one embedding call, one (instant) layer, all leave at exit 1. A rate
    # that left the embedding out would predict a queue drains faster than it does.
    scheduler, _ = make(SlowEmbedding(), max_batch=32, max_wait_ms=50.0)
    await answers(scheduler, [1] * 32, 0.5)
    # The answers reach the loop inside the worker's step; the step's time is recorded after it.
    scheduler.admission.close()
    assert scheduler.join(5)
    per_row = SlowEmbedding.EMBED_S / 32
    assert scheduler.admission.rate.seconds_per_row >= 0.2 * per_row  # the EWMA's first step from 0


@pytest.mark.asyncio
async def test_a_predicted_wait_or_a_loop_lag_exactly_at_its_bound_is_let_in():
    lag_s, clock = 0.05, Clock()
    admission = Admission(Metrics(6), max_queue=8, max_queue_wait_s=0.375, workers=1, seconds_per_row=0.25,
                          loop_lag_s=lambda: lag_s, max_loop_lag_s=0.05, clock=clock)
    ticket = Ticket(3, asyncio.get_running_loop())
    row = lambda i: Row(rows([3])[0], 0.0, clock.now, math.inf, ticket, i)  # noqa: E731
    assert admission.door() is None  # lag exactly at its bound
    lag_s = 0.0625
    assert admission.door().code == "overloaded"
    lag_s = 0.05
    admission.admit([row(0)], None)
    assert admission.take(1)  # in flight
    admission.admit([row(1)], None)
    assert admission.predicted_wait() == 0.375  # (1 queued + 1/2 in flight) x 0.25 s: exactly the bound
    assert admission.door() is None
    admission.admit([row(2)], None)
    assert admission.predicted_wait() > 0.375 and admission.door().code == "overloaded"


def test_while_the_event_loop_runs_late_the_door_refuses_though_the_queue_is_empty():
    lag_s = 0.8
    metrics = Metrics(6)
    admission = Admission(metrics, max_queue=8, max_queue_wait_s=60.0, workers=1, seconds_per_row=0.0,
                          loop_lag_s=lambda: lag_s, max_loop_lag_s=0.05)
    refused = admission.door()
    assert refused.code == "overloaded" and "800 ms behind on its connections, over its bound of 50 ms" in str(refused)
    assert refused.retry_after == "2"  # twice the lag, in whole seconds
    assert metrics.registry.get_sample_value("romebert_rejected_requests_total", {"reason": "loop_lag"}) == 1
    lag_s = 0.01  # caught up
    assert admission.door() is None


@pytest.mark.asyncio
async def test_a_budgeted_request_waits_only_for_the_budgeted_rows_before_it_and_half_a_step():
    # The workers take a budgeted row at a layer boundary once it cannot wait (budgets.py), so the
    # unbudgeted queue is not its wait; the budgeted rows queued before it and the step in progress are.
    clock, metrics, loop = Clock(), Metrics(6), asyncio.get_running_loop()
    admission = Admission(metrics, max_queue=64, max_queue_wait_s=60.0, workers=1, seconds_per_row=0.125, clock=clock)
    admission.rate.seconds_per_step = 0.0625

    def request(n: int, budget_s: float | None = None) -> list[Row]:
        ticket, deadline = Ticket(n, loop), math.inf if budget_s is None else clock.now + budget_s
        return [Row(token, 0.0, clock.now, deadline, ticket, i) for i, token in enumerate(rows([3] * n))]

    admission.admit(request(1, 1e-6), 1e-6)  # an idle server: nothing ahead, not even a step
    assert admission.take(1)
    admission.admit(request(10), None)
    assert admission.predicted_wait() == 1.3125  # (10 queued + 1/2 in flight) x 0.125 s
    admission.admit(request(1, 0.03125), 0.03125)  # half a 0.0625 s step: exactly its budget
    with pytest.raises(Rejected, match="predicted wait of 156 ms for a request with a budget exceeds its budget of 31 ms") as refused:
        admission.admit(request(1, 0.03125), 0.03125)  # the budgeted row before it, and half a step
    assert refused.value.retry_after_s == 0.15625  # come back when the budgeted wait has drained
    admission.admit(request(1, 0.15625), 0.15625)
    assert metrics.registry.get_sample_value("romebert_rejected_requests_total", {"reason": "budget"}) == 1


@pytest.mark.asyncio
async def test_a_row_that_waited_past_the_bound_is_answered_503_and_never_run():
    clock = Clock()
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, max_queue_wait_s=0.5, clock=clock)
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    on_time = submit(scheduler, [4], 0.0)
    clock.now += 0.5  # waited exactly the bound when the worker takes it: it runs
    engine.step(3)
    await wait_for(lambda: len(engine.calls) == 4)
    late = submit(scheduler, [1, 1], 0.0)
    clock.now += 1.5  # the request in flight takes long: the queued one has now waited 1.5 s
    engine.step(3)
    assert [a.exit_layer for a in await done(running, on_time)] == [3, 3]
    with pytest.raises(Rejected, match="waited 1500 ms in the queue, over the server's bound of 500 ms"):
        await done(late)
    assert [codes for _, codes in engine.calls] == [[3]] * 3 + [[4]] * 3
    # the second row is dropped with its ticket, counted under the reason the ticket closed with
    await wait_for(lambda: shed(scheduler, "expired") == 2)
    assert shed(scheduler, "cancelled") == 0


@pytest.mark.asyncio
async def test_a_request_of_many_texts_that_takes_longer_than_the_bound_to_run_is_served_whole():
    """The bound is on the wait for other requests' work: once its first row started, the rest of a
    request is its own work (one expired row would fail the whole request)."""
    clock = Clock()
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, max_queue_wait_s=0.5, clock=clock)
    many = submit(scheduler, [3, 3, 3], 0.0)  # one row a batch: each row runs after the one before
    await wait_for(lambda: len(engine.calls) == 1)
    clock.now += 1.0  # the first row's layers take long: the other two have waited twice the bound
    engine.step(9)
    assert [a.exit_layer for a in await done(many)] == [3, 3, 3]
    assert [codes for _, codes in engine.calls] == [[3]] * 9
    assert shed(scheduler, "expired") == 0
    queued = submit(scheduler, [3], 0.0)  # a request none of whose rows started is still held to it
    late = submit(scheduler, [1], 0.0)
    await wait_for(lambda: len(engine.calls) == 10)
    clock.now += 1.0
    engine.step(3)
    await done(queued)
    with pytest.raises(Rejected, match="waited 1000 ms in the queue"):
        await done(late)


@pytest.mark.asyncio
async def test_an_idle_worker_starts_only_the_oldest_rows_length_group_and_the_others_keep_their_place_in_the_queue():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=2, max_wait_ms=0.0)
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    long = submit(scheduler, [4], 0.5, length=200)
    shorts = [submit(scheduler, [1], 0.5) for _ in range(3)]
    engine.step(3)  # running ends; the oldest queued row is the long one, alone in its length group
    await wait_for(lambda: len(engine.calls) == 4)
    assert engine.calls[3] == (0, [4])
    assert scheduler.metrics.registry.get_sample_value("romebert_queue_depth") == 3  # the short rows wait in the queue
    engine.step(3)
    await done(running, long, *shorts)
    # then the short rows, a full batch of them (max_batch 2) and the one left
    assert [codes for _, codes in engine.calls[3:]] == [[4], [1, 1], [1]]


@pytest.mark.asyncio
async def test_a_batch_holds_at_most_max_batch_tokens_rows_x_tokens_so_wide_rows_come_in_smaller_batches():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=8, max_batch_tokens=100, max_wait_ms=0.0)
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    wide = [submit(scheduler, [1], 0.5, length=30) for _ in range(4)]  # 3 x 30 = 90 fits 100, 4 x 30 does not
    narrow = [submit(scheduler, [1], 0.5, length=10) for _ in range(8)]  # 8 x 10 = 80: max_batch rows
    engine.step(6)
    await done(running, *wide, *narrow)
    assert [codes for _, codes in engine.calls[3:]] == [[1] * 3, [1], [1] * 8]


@pytest.mark.asyncio
async def test_a_length_group_that_starts_past_the_bound_is_answered_503_though_it_was_taken_in_time():
    """Under regroup a worker takes new rows at a layer boundary, as length groups that start one after another."""
    clock = Clock()
    scheduler, engine = make(FakeEngine(stepping=True), policy="regroup", max_wait_ms=0.0, max_queue_wait_s=0.5,
                             seconds_per_row=0.1, clock=clock)
    steps = []
    record = scheduler.admission.rate.record
    scheduler.admission.rate.record = lambda seconds, rows, stepped: (steps.append(stepped), record(seconds, rows, stepped))
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    short, long = submit(scheduler, [3], 0.0, length=20), submit(scheduler, [4], 0.0, length=200)
    engine.step(1)  # at the boundary the worker takes both, on time, as two fresh cohorts: the short one runs first
    await wait_for(lambda: len(engine.calls) == 2)
    clock.now += 1.0  # the short group's layer takes long: the long one has now waited 1 s
    engine.step(5)
    assert [a.exit_layer for a in await done(running, short)] == [3, 3]
    with pytest.raises(Rejected, match="waited 1000 ms in the queue, over the server's bound of 500 ms"):
        await done(long)
    assert [codes for _, codes in engine.calls] == [[3]] * 6
    assert shed(scheduler, "expired") == 1
    await wait_for(lambda: scheduler.admission.predicted_wait() == 0.0)  # nothing left in flight
    assert steps.count(True) == len(engine.calls)  # the step times are the layer runs', not the cut group's


@pytest.mark.asyncio
async def test_the_queue_wait_metric_is_the_time_from_arrival_to_a_worker_taking_the_row():
    clock = Clock()
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, clock=clock)
    running = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    queued = submit(scheduler, [3], 0.0)
    clock.now += 0.25
    engine.step(6)
    await done(running, queued)
    sample = scheduler.metrics.registry.get_sample_value
    assert sample("romebert_queue_wait_seconds_count") == 2 and sample("romebert_queue_wait_seconds_sum") == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_a_budgeted_row_is_still_found_urgent_after_an_unbudgeted_row_ahead_of_it_was_dropped():
    clock = Clock()
    admission = Admission(Metrics(6), max_queue=8, max_queue_wait_s=60.0, workers=1, seconds_per_row=0.0, clock=clock)
    loop = asyncio.get_running_loop()
    gone, budgeted = Ticket(1, loop), Ticket(1, loop)
    admission.admit([Row(rows([3])[0], 0.0, clock.now, math.inf, gone, 0)], None)
    admission.admit([Row(rows([3])[0], 0.0, clock.now, clock.now + 10.0, budgeted, 0)], 10.0)
    gone.cancel()
    assert admission.take_urgent(lambda: clock.now + 5.0, 8) == []  # drops the cancelled row; the budgeted one is not urgent yet
    assert [row.ticket for row in admission.take_urgent(lambda: clock.now + 20.0, 8)] == [budgeted]


def test_the_urgent_take_predicts_how_long_the_work_in_flight_takes_only_when_a_budgeted_row_is_queued():
    clock = Clock()
    admission = Admission(Metrics(6), max_queue=8, max_queue_wait_s=60.0, workers=1, seconds_per_row=0.0, clock=clock)
    asked = []

    def must_start_by() -> float:  # the worker's costs a prediction per layer left, at every layer boundary
        asked.append(True)
        return clock.now

    loop = asyncio.new_event_loop()
    try:
        admission.admit([Row(rows([3])[0], 0.0, clock.now, math.inf, Ticket(1, loop), 0)], None)
        assert admission.take_urgent(must_start_by, 8) == [] and not asked
        admission.admit([Row(rows([3])[0], 0.0, clock.now, clock.now + 10.0, Ticket(1, loop), 0)], 10.0)
        assert admission.take_urgent(must_start_by, 8) == [] and asked == [True]
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_a_cancelled_request_leaves_its_batch_before_the_next_layer_and_the_queue_before_it_runs():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=2, max_wait_ms=50.0)
    stays = submit(scheduler, [3], 0.0)
    leaves = submit(scheduler, [4], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)  # layer 1 of both, one batch
    never = submit(scheduler, [2], 0.0)  # queued behind the batch
    leaves.cancel()
    never.cancel()
    engine.step(3)
    (a,) = await done(stays)
    await wait_for(lambda: shed(scheduler, "cancelled") == 2)
    assert engine.calls == [(0, [3, 4]), (1, [3]), (2, [3])]
    assert a.exit_layer == 3
    assert leaves.future.cancelled() and never.future.cancelled()


@pytest.mark.asyncio
async def test_a_batch_whose_rows_all_left_is_dropped_while_another_goes_on():
    scheduler, engine = make(FakeEngine(stepping=True), max_wait_ms=0.0, policy="regroup")
    gone = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)  # its layer 1 runs
    stays = submit(scheduler, [3], 0.0, length=20)
    gone.cancel()  # its whole cohort is empty after this layer
    engine.step(10)
    (a,) = await done(stays)
    assert a.exit_layer == 3 and shed(scheduler, "cancelled") == 1
    assert engine.calls == [(0, [3]), (0, [3]), (1, [3]), (2, [3])]


class Boom(BaseException):
    """What kills a worker: raised outside any engine call, and not an Exception."""


@pytest.mark.asyncio
async def test_a_worker_that_dies_fails_its_rows_and_the_queue_with_503_and_reports_it():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0)
    in_flight = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    queued = submit(scheduler, [3], 0.0)

    def broken(*args):
        raise Boom("worker bug")

    scheduler.admission.take_urgent = broken  # called at the next layer boundary
    started = time.monotonic()
    engine.step(1)
    for ticket in (in_flight, queued):
        with pytest.raises(Rejected) as failed:
            await done(ticket)
        assert failed.value.code == "worker_failed" and failed.value.retry_after == "1"
    assert time.monotonic() - started < 1.0
    await wait_for(lambda: scheduler.failures)  # reported right after its rows are answered
    assert [type(err) for err in scheduler.failures] == [Boom]
    assert scheduler.join(timeout=5) and not scheduler.alive
    with pytest.raises(Rejected):
        submit(scheduler, [3], 0.0)
    assert shed(scheduler, "worker_failed") == 1  # the queued row; the one in flight was failed by its worker
    assert scheduler.metrics.registry.get_sample_value("romebert_queue_depth") == 0


@pytest.mark.asyncio
async def test_draining_answers_queued_rows_that_cannot_start_in_time_at_once_and_serves_the_rest():
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, seconds_per_row=1.0)
    in_flight = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    fits, late1, late2 = (submit(scheduler, [3], 0.0) for _ in range(3))
    scheduler.admission.close(drain_s=2.0)  # 2 s at 1 s per row: the row in flight and one more
    for ticket in (late1, late2):
        with pytest.raises(Rejected) as refused:
            await done(ticket)
        assert refused.value.code == "shutting_down" and refused.value.retry_after == "1"
    engine.step(6)
    assert [a.exit_layer for a in await done(in_flight, fits)] == [3, 3]
    assert shed(scheduler, "draining") == 2
    assert scheduler.join(timeout=5)


@pytest.mark.asyncio
@pytest.mark.parametrize("overrun_s, runs", [(1.0, True), (1.5, False)])
async def test_while_draining_a_row_kept_at_close_still_must_be_able_to_start_before_the_deadline(overrun_s, runs):
    """close() keeps the rows predicted to start in time; if the work in flight then takes longer
    than predicted, a kept row that can no longer finish its first row-time before the deadline
    is answered 503 when a worker reaches it."""
    clock = Clock()
    scheduler, engine = make(FakeEngine(stepping=True), max_batch=1, max_wait_ms=0.0, seconds_per_row=1.0, clock=clock)
    in_flight = submit(scheduler, [3], 0.0)
    await wait_for(lambda: len(engine.calls) == 1)
    kept = submit(scheduler, [3], 0.0)
    scheduler.admission.close(drain_s=2.0)  # the row in flight and one more fit
    clock.now += overrun_s  # the row in flight took this long; the kept one needs 1 s before the deadline
    engine.step(6)
    assert len(await done(in_flight)) == 1
    if runs:
        assert len(await done(kept)) == 1
    else:
        with pytest.raises(Rejected, match="shutting down"):
            await done(kept)
        assert shed(scheduler, "draining") == 1


@pytest.mark.asyncio
async def test_draining_keeps_as_many_queued_rows_as_the_workers_can_start_in_time():
    scheduler, engine = make(FakeEngine(stepping=True), workers=2, max_batch=1, max_wait_ms=0.0, seconds_per_row=0.5)
    in_flight = [submit(scheduler, [3], 0.0) for _ in range(2)]
    await wait_for(lambda: len(engine.calls) == 2)
    queued = [submit(scheduler, [3], 0.0) for _ in range(4)]
    scheduler.admission.close(drain_s=1.0)  # 2 workers x 1 s / 0.5 s per row = 4 rows, 2 of them in flight
    for ticket in queued[2:]:
        with pytest.raises(Rejected, match="shutting down"):
            await done(ticket)
    engine.step(4 * 3)
    assert [a.exit_layer for a in await done(*in_flight, *queued[:2])] == [3] * 4


# -- the real engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_bundle):
    from romebert.core.bundle import load_bundle
    from romebert.core.engine import Engine
    from romebert.core.tokenization import TextEncoder

    bundle = load_bundle(tiny_bundle)
    return Engine(bundle, device="cpu"), TextEncoder(bundle.tokenizer_file, bundle.max_length)


def test_merging_cohorts_of_different_widths_is_exact(tiny_engine):
    engine, encoder = tiny_engine
    short = encoder.encode(["a fine film"])
    long = encoder.encode(["a long and winding review that goes on about the plot for a while"])
    reference = engine.all_exit_logits(short)[:, 0]

    state, _ = engine.layer(0, engine.embed(short))
    other, _ = engine.layer(0, engine.embed(long))
    merged = engine.merge([state, other])
    assert merged.attention_mask.shape == (2, long.input_ids.shape[1])
    for i in range(1, engine.num_layers):
        merged, logits = engine.layer(i, merged)
        np.testing.assert_allclose(logits[0], reference[i], atol=1e-5)


def test_padding_changes_no_output_whatever_the_pad_id(tiny_engine):
    engine, encoder = tiny_engine
    short, long = encoder.tokenize(["a fine film", "a long and winding review that goes on about the plot for a while"])
    alone = engine.all_exit_logits(pad([short]))[:, 0]
    for pad_id in (0, 7):
        batch = pad([short, long], pad_id)
        assert batch.attention_mask[0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))
        np.testing.assert_allclose(engine.all_exit_logits(batch)[:, 0], alone, atol=1e-5)


def test_the_io_binding_path_computes_what_the_host_path_does(tiny_engine):
    """The CUDA path's logic (bindings, on-device row gather, merges of OrtValues), run on the CPU."""
    import onnxruntime as ort

    from romebert.core.engine import Engine

    host, encoder = tiny_engine
    resident = Engine(host.bundle, device="cpu", io_binding=True)
    pair = encoder.encode(["a fine film", "meh"])
    long = encoder.encode(["a long and winding review that goes on about the plot for a while"])

    def survivors_merged_with_a_newcomer(engine) -> np.ndarray:
        state, _ = engine.layer(0, engine.embed(pair))
        state = engine.keep(state, [1])
        other, _ = engine.layer(0, engine.embed(long))
        state = engine.merge([state, other])
        exits = []
        for i in range(1, engine.num_layers):
            state, logits = engine.layer(i, state)
            exits.append(logits)
        return np.stack(exits)

    assert isinstance(resident.embed(pair).hidden, ort.OrtValue)
    np.testing.assert_allclose(resident.all_exit_logits(pair), host.all_exit_logits(pair), atol=1e-6)
    np.testing.assert_allclose(survivors_merged_with_a_newcomer(resident), survivors_merged_with_a_newcomer(host), atol=1e-6)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("policy", POLICIES)
async def test_the_scheduler_answers_as_the_full_model_does(tiny_engine, workers, policy):
    engine, encoder = tiny_engine
    texts = ["great", "a dull, plodding film", "one of the best of the year, funny and warm", "meh"]
    reference = engine.all_exit_logits(encoder.encode(texts))  # (L, B, C)
    scheduler, _ = make(engine, max_batch=8, max_wait_ms=0.0, workers=workers, policy=policy)
    for threshold in (0.0, 0.6931):
        # one request per text, so that with two workers the rows spread over both
        got = await done(*(scheduler.submit(encoder.tokenize([text]), threshold, None, scheduler.clock()) for text in texts))
        layers = exit_layers(reference, threshold)
        assert [a.exit_layer for a in got] == layers.tolist()
        for row, a in enumerate(got):
            np.testing.assert_allclose(a.logits, reference[a.exit_layer - 1, row], atol=1e-5)
