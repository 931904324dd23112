"""Intervals on accuracies and the early-exit figure of merit (training/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.exit_rules import at_speedup, entropy_curve
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


def test_the_threshold_for_a_speedup_is_the_least_aggressive_that_reaches_it_on_dev():
    # 2 exits, 4 examples. Exit 1: sure and right for 0-1 (entropy ~0), fairly sure and right for 2
    # (entropy ~0.3), unsure and wrong for 3; exit 2: wrong for 2, right for the rest.
    sure, fairly, unsure = [8.0, -8.0], [1.5, -1.5], [0.1, -0.1]
    logits = np.array([[sure, sure, fairly, unsure], [sure, sure, [-8.0, 8.0], [-8.0, 8.0]]])
    labels = np.array([0, 0, 0, 1])
    t = threshold_for_speedup(logits, 8 / 7)  # one row leaving at exit 1 is enough
    correct, avg_exit = correct_at(logits, labels, t)
    assert avg_exit == 1.5 and correct.mean() == 0.75  # the two sure rows leave, 2 goes on and fails
    more = correct_at(logits, labels, 0.4)  # leaving 2 at exit 1 too would score 4 of 4 on dev ...
    assert more[0].all() and more[1] == 1.25  # ... but that is a speed-up past the one asked for
    assert threshold_for_speedup(logits, 2.0) is not None  # everyone at exit 1 (threshold near ln 2)
    assert threshold_for_speedup(logits, 2.5) is None  # L / 1 = 2 at most


def test_a_curve_is_read_at_its_least_aggressive_point_reaching_the_speedup():
    curve = [(1.0, 0.83), (1.6, 0.82), (2.0, 0.80), (2.0, 0.81), (2.4, 0.815), (3.1, 0.79)]
    assert at_speedup(curve, 2) == 0.81  # 2.0x is the least; of its two points the more accurate
    assert at_speedup(curve, 3) == 0.79
    assert at_speedup(curve, 3 - 1e-12) == 0.79 and at_speedup([(2.9999999999, 0.7)], 3) == 0.7  # float averages of whole layers
    assert at_speedup(curve, 3.2) is None


def test_the_benchmark_and_the_exit_rule_comparison_read_the_entropy_curve_at_the_same_point():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=(6, 200, 2)) + np.linspace(0, 3, 6)[:, None, None] * [1.0, -1.0]
    labels = (rng.random(200) < 0.2).astype(int)
    for speedup in (1.5, 2, 3, 4):
        t = threshold_for_speedup(logits, speedup)
        assert at_speedup(entropy_curve(logits, labels), speedup) == correct_at(logits, labels, t)[0].mean()


def test_where_the_first_exit_is_barely_sure_the_threshold_still_finds_the_speedup_asked_for():
    # Exit 1's entropies all lie within 0.001 of ln 2, as IMDB's do; its surer half is right, the
    # other half wrong; exit 2 is right for all. An even grid over [0, ln 2] has no threshold
    # between those entropies, so 4/3x would be met only by every row leaving at exit 1 (50%).
    gaps = np.linspace(0.004, 0.006, 8)  # rows 4-7: the wider logit gaps, so the lower entropies
    sign = np.where(np.arange(8) >= 4, 1.0, -1.0)
    first = np.stack([sign * gaps / 2, -sign * gaps / 2], -1)
    second = np.tile([8.0, -8.0], (8, 1))
    logits, labels = np.stack([first, second]), np.zeros(8, dtype=int)
    t = threshold_for_speedup(logits, 4 / 3)
    correct, avg_exit = correct_at(logits, labels, t)
    assert avg_exit == 1.5 and correct.all()


def test_the_training_benchmark_reports_the_targets_margin_to_fine_tuning_with_its_paired_interval():
    from bench.train import SPEEDUPS, report, summarize

    rng = np.random.default_rng(5)

    labels = {(seed, split): rng.integers(0, 2, 400) for seed in (1, 2) for split in ("dev", "test")}

    def run(seed: int) -> dict:  # six exits of noisy logits leaning to the right label; each seed's splits shared by the methods (paired)
        r = {"train_seconds": 1.0, "precision": "fp32"}
        for split in ("dev", "test"):
            r[f"{split}_labels"] = labels[seed, split]
            r[f"{split}_logits"] = rng.normal(0, 2, (6, 400, 2)) + 1.5 * np.eye(2)[labels[seed, split]]
        return r

    runs = {method: {seed: run(seed) for seed in (1, 2)} for method in ("finetune", "deebert", "romebert")}
    summary = summarize("rotten_tomatoes", runs)
    finetune = summary["methods"]["finetune"]["test_acc_per_exit_mean"][0]
    margins = summary["paired_test_difference"]["romebert_at_speedup_minus_finetune_full_depth"]
    for s in SPEEDUPS:
        margin = margins[str(s)]["pooled"]
        assert margin["difference"] == pytest.approx(summary["methods"]["romebert"]["acc_at_speedup"][str(s)]["mean"] - finetune)
        assert margin["lo"] < margin["difference"] < margin["hi"]
        row = next(line for line in report("rotten_tomatoes", summary).splitlines() if line.startswith(f"| test accuracy at ≥ {s}x"))
        assert row.rstrip(" |").endswith(f"{100 * margin['difference']:+.1f} [{100 * margin['lo']:+.1f}, {100 * margin['hi']:+.1f}]")
