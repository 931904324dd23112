"""What the engine is predicted to cost: the numbers budgets and admission act on."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from romebert.service.cohorts import BatchLimit
from romebert.service.cost_model import EwmaCostModel, ServiceRate, bucket, buckets_up_to, warm_up


@given(st.integers(1, 100_000))
def test_a_bucket_is_the_smallest_power_of_two_that_holds_n(n):
    b = bucket(n)
    assert b & (b - 1) == 0 and b >= n and (b == 1 or b // 2 < n)


def test_warm_up_sizes_are_powers_of_two_up_to_the_largest_real_size():
    assert buckets_up_to(32) == [1, 2, 4, 8, 16, 32]
    assert buckets_up_to(40, start=8) == [8, 16, 32, 40]
    assert buckets_up_to(1) == [1]


class ShapeRecorder:
    """An engine stand-in that records the (rows, width) each layer call runs."""

    num_layers = 2

    def __init__(self):
        self.ran = []

    def embed(self, batch):
        return batch

    def layer(self, i, state):
        if i == 0:
            self.ran.append(state.attention_mask.shape)
        return state, None


def as_given(rows: int, width: int) -> tuple[int, int]:
    return rows, width


def test_the_warm_up_runs_every_shape_once_largest_first_so_buffers_grow_once():
    engine = ShapeRecorder()
    model = EwmaCostModel(engine.num_layers)
    warm_up(engine, model, BatchLimit(32, math.inf, as_given), max_length=64)
    first_pass, *grid = engine.ran
    assert first_pass == (1, 8)  # the unrecorded pass that pays first-call costs
    assert sorted(grid) == sorted((r, w) for r in buckets_up_to(32) for w in buckets_up_to(64, start=8))
    assert grid[0] == (32, 64)
    tokens = [r * w for r, w in grid]
    assert tokens == sorted(tokens, reverse=True)


def test_the_warm_up_runs_no_shape_past_the_batch_limit_but_the_largest_each_width_allows():
    engine = ShapeRecorder()
    warm_up(engine, EwmaCostModel(engine.num_layers), BatchLimit(64, 2048, as_given), max_length=64)
    grid = engine.ran[1:]
    assert max(r * w for r, w in grid) == 2048
    assert {(64, 32), (32, 64)} <= set(grid)  # short rows in batches of 64, the longest in batches of 32
    assert len(grid) == len(set(grid))


class CostRecorder:
    """A cost model stand-in that records what it is told."""

    def __init__(self):
        self.observed = []

    def observe(self, layer, rows, width, seconds):
        self.observed.append((layer, rows, width))

    def predict(self, layer, rows, width):
        return 1.0


def test_the_warm_up_runs_an_engine_s_finer_shapes_but_records_each_cost_bucket_once_at_its_largest_shape():
    engine = ShapeRecorder()
    engine.shapes = lambda max_rows, max_width: [(r, w) for r in (3, 4, 6, 8) for w in (16, 24, 32)]
    model = CostRecorder()
    warm_up(engine, model, BatchLimit(8, math.inf, as_given), max_length=32)
    assert sorted(engine.ran[1:]) == sorted((r, w) for r in (3, 4, 6, 8) for w in (16, 24, 32))
    # rows 3 and 4 share the cost model's bucket 4, 6 and 8 its 8; widths 24 and 32 its 32
    assert sorted((r, w) for layer, r, w in model.observed if layer == 0) == [(4, 16), (4, 32), (8, 16), (8, 32)]
    assert sorted((r, w) for layer, r, w in model.observed if layer == 1) == [(4, 16), (4, 32), (8, 16), (8, 32)]


def test_a_layer_cost_starts_at_its_first_measurement_then_follows_an_ewma():
    model = EwmaCostModel(num_layers=2, alpha=0.25)
    model.observe(0, rows=4, width=16, seconds=1.0)
    assert model.predict(0, 4, 16) == 1.0
    model.observe(0, rows=3, width=16, seconds=3.0)  # 3 rows share the 4-row bucket
    assert model.predict(0, 4, 16) == pytest.approx(1.0 + 0.25 * (3.0 - 1.0))


def test_an_unseen_size_borrows_the_nearest_seen_one_scaled_by_tokens():
    model = EwmaCostModel(num_layers=2)
    model.observe(0, rows=4, width=16, seconds=1.0)
    model.observe(0, rows=32, width=64, seconds=10.0)
    assert model.predict(0, 8, 16) == pytest.approx(2.0)  # nearest 4 x 16, twice the tokens
    assert model.predict(0, 32, 128) == pytest.approx(20.0)  # nearest 32 x 64
    assert model.predict(1, 4, 16) == 0.0  # nothing seen for the layer: never stop a row on no evidence


def test_the_service_rate_moves_once_per_window_of_rows_toward_that_window_s_mean():
    rate = ServiceRate(seconds_per_row=0.01, alpha=0.5, window=4)
    rate.record(0.1, 2)
    assert rate.seconds_per_row == 0.01  # half a window: no sample yet
    rate.record(0.1, 2)  # 0.2 s for 4 rows: a sample of 0.05
    assert rate.seconds_per_row == pytest.approx(0.01 + 0.5 * (0.05 - 0.01))
    rate.record(0.4, 3)
    assert rate.seconds_per_row == pytest.approx(0.03)  # a new window started empty
    rate.record(0.0, 1)  # that window alone: 0.4 s for 4 rows
    assert rate.seconds_per_row == pytest.approx(0.03 + 0.5 * (0.1 - 0.03))


def test_the_seconds_per_step_move_toward_every_step_from_no_evidence():
    rate = ServiceRate(seconds_per_row=0.01, alpha=0.5, window=4)
    assert rate.seconds_per_step == 0.0  # no step seen: a row that jumps the queue waits for none
    rate.record(0.1, 0)  # a step after which no row left still took its time
    assert rate.seconds_per_step == pytest.approx(0.05)
    rate.record(0.3, 2)
    assert rate.seconds_per_step == pytest.approx(0.175)
    rate.record(0.001, 2, stepped=False)  # rows cut before any layer ran: no wait for a boundary in that
    assert rate.seconds_per_step == pytest.approx(0.175)
    assert rate.seconds_per_row == pytest.approx(0.01 + 0.5 * (0.401 / 4 - 0.01))  # but its rows and time count
