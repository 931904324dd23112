"""Intervals on accuracies and the early-exit figure of merit (training/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from romebert.training.intervals import correct_at, interval, paired_difference, threshold_for_speedup


def test_an_accuracy_on_853_examples_carries_about_plus_minus_two_and_a_half_points():
    correct = np.random.default_rng(1).random(853) < 0.83
    ci = interval(correct)
    assert ci["lo"] < ci["accuracy"] < ci["hi"]
    assert 0.046 < ci["hi"] - ci["lo"] < 0.056  # 2 x 1.96 x sqrt(0.83 x 0.17 / 853) = 0.050
    assert abs((ci["accuracy"] - ci["lo"]) - (ci["hi"] - ci["accuracy"])) < 0.004  # 2.5% cut off each side


def test_every_example_can_be_drawn_into_a_resample():
    ci = interval(np.array([1] + [0] * 9))  # only the first example is right
    assert ci["lo"] < ci["accuracy"] == 0.1 < ci["hi"]


def test_a_paired_difference_is_much_tighter_than_two_separate_intervals():
    rng = np.random.default_rng(2)
    a = rng.random(853) < 0.83
    b = a.copy()
    b[np.flatnonzero(a)[:9]] = False  # b loses 9 examples a gets right: 1.1 points, and nothing else differs
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(9 / 853) and 0 < d["lo"] <= d["difference"] <= d["hi"]
    assert 0.011 < d["hi"] - d["lo"] < 0.016  # 2 x 1.96 x sqrt(p (1 - p) / 853), p = 9 / 853: 0.0137
    assert d["hi"] - d["lo"] < (interval(a)["hi"] - interval(a)["lo"]) / 2
    same = paired_difference(a, a)
    assert same == {"difference": 0.0, "lo": 0.0, "hi": 0.0}


def test_the_threshold_for_a_speedup_is_the_most_accurate_that_reaches_it_on_dev():
    # 2 exits, 4 examples: exit 1 is sure (entropy ~0) and right for examples 0-1, unsure for 2-3
    sure, unsure = [8.0, -8.0], [0.1, -0.1]
    logits = np.array([[sure, sure, unsure, unsure], [sure, sure, [-8.0, 8.0], [-8.0, 8.0]]])
    labels = np.array([0, 0, 1, 1])
    t = threshold_for_speedup(logits, labels, 4 / 3)  # avg exit 1.5: the sure two leave at exit 1
    assert t is not None and 0 < t <= 0.69
    assert threshold_for_speedup(logits, labels, 2.0) is not None  # everyone at exit 1 (threshold near ln 2)
    assert threshold_for_speedup(logits, labels, 2.5) is None  # L / 1 = 2 at most


def test_where_the_first_exit_is_barely_sure_the_threshold_still_finds_the_speedup_asked_for():
    # Exit 1's entropies all lie within 0.001 of ln 2, as IMDB's do; its surer half is right, the
    # other half wrong; exit 2 is right for all. An even grid over [0, ln 2] has no threshold
    # between those entropies, so 4/3x would be met only by every row leaving at exit 1 (50%).
    gaps = np.linspace(0.004, 0.006, 8)  # rows 4-7: the wider logit gaps, so the lower entropies
    sign = np.where(np.arange(8) >= 4, 1.0, -1.0)
    first = np.stack([sign * gaps / 2, -sign * gaps / 2], -1)
    second = np.tile([8.0, -8.0], (8, 1))
    logits, labels = np.stack([first, second]), np.zeros(8, dtype=int)
    t = threshold_for_speedup(logits, labels, 4 / 3)
    correct, avg_exit = correct_at(logits, labels, t)
    assert avg_exit == 1.5 and correct.all()
