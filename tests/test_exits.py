"""The exit rule (core/exits.py), the one the server, the export's calibration and evaluation share."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from romebert.core.exits import can_leave_early, confident, entropy, exit_layers, softmax_entropy, sweep

logit_rows = arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 5)), elements=st.floats(-1e4, 1e4, width=32))


def test_a_row_leaves_only_when_its_entropy_is_strictly_below_its_threshold():
    assert confident(np.array([0.3, 0.2999, 0.3001]), 0.3).tolist() == [False, True, False]
    assert confident(np.array([0.3, 0.3]), np.array([0.3, 0.31])).tolist() == [False, True]  # each row its own threshold


def test_threshold_zero_means_full_depth_even_where_an_exit_is_certain():
    certain = np.array([[[1000.0, 0.0]], [[1000.0, 0.0]], [[0.0, 1000.0]]])  # entropy exactly 0 at every exit
    assert entropy(certain).tolist() == [[0.0], [0.0], [0.0]]
    assert exit_layers(certain, 0.0).tolist() == [3]
    assert exit_layers(certain, 1e-9).tolist() == [1]
    assert not can_leave_early(np.array([0.0, 0.0])) and can_leave_early(np.array([0.0, 0.1]))


def test_a_row_no_exit_is_sure_of_leaves_at_the_last():
    unsure = np.zeros((4, 2, 3))  # uniform: entropy ln 3 at every exit
    assert np.allclose(entropy(unsure), math.log(3))
    assert exit_layers(unsure, math.log(3)).tolist() == [4, 4]
    assert exit_layers(unsure, math.log(3) + 1e-9).tolist() == [1, 1]


def test_entropy_is_shannons_in_nats():
    logits = np.log(np.array([[3.0, 1.0], [1.0, 1.0], [8.0, 1.0]]))  # p = 3/4 1/4, 1/2 1/2, 8/9 1/9
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.allclose(entropy(logits), -(p * np.log(p)).sum(-1))
    probabilities, entropies = softmax_entropy(logits)
    assert np.allclose(probabilities, p) and np.array_equal(entropies, entropy(logits))


@given(logit_rows)
def test_entropy_and_softmax_stay_finite_and_in_range_whatever_the_logits(logits):
    p, h = softmax_entropy(logits)
    assert np.isfinite(h).all() and (h >= 0).all() and (h <= math.log(logits.shape[-1]) + 1e-9).all()
    assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1.0)


@given(logit_rows, st.floats(-100, 100))
def test_entropy_ignores_a_shift_of_every_logit(logits, shift):
    assert np.allclose(entropy(logits.astype(np.float64)), entropy(logits.astype(np.float64) + shift), atol=1e-6)


def test_the_sweep_reports_the_accuracy_and_depth_of_the_exits_the_rule_picks():
    # exit 1 sure of label 0 for row 0 only; exit 2 sure of the right labels for both
    logits = np.array([[[9.0, 0.0], [0.1, 0.0]], [[0.0, 9.0], [0.0, 9.0]]])
    labels = np.array([0, 1])
    full, early = sweep(logits, labels, thresholds=(0.0, 0.01))
    assert full == {"threshold": 0.0, "accuracy": 0.5, "avg_exit_layer": 2.0, "speedup": 1.0}  # row 0 wrong at exit 2
    assert early == {"threshold": 0.01, "accuracy": 1.0, "avg_exit_layer": 1.5, "speedup": 2 / 1.5}
