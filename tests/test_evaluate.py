"""Evaluation (training/evaluate.py): forced exits, F1, and logits that come back in the split's order
(core.tokenization.LengthBatches, which the export's calibration shares)."""

from __future__ import annotations

import numpy as np
import torch

from romebert.core.tokenization import LengthBatches, TextEncoder, TokenRow, pad
from romebert.training.evaluate import exit_logits, f1_binary, paired_report, per_exit_metrics, report_from_logits
from romebert.training.model import MultiExitBert


def test_length_batches_pad_each_batch_to_its_own_longest_row_and_put_results_back_in_split_order():
    lengths = [9, 2, 5, 2, 7]
    split = pad([TokenRow(np.arange(1, n + 1), np.zeros(n, dtype=np.int64), False) for n in lengths])
    batches = LengthBatches.of(split, 2)
    assert [b.lengths.tolist() for b in batches.batches] == [[2, 2], [5, 7], [9]]
    assert [b.input_ids.shape[1] for b in batches.batches] == [2, 7, 9]
    back = batches.in_split_order(np.stack([b.lengths, -b.lengths])[:, :, None] for b in batches.batches)  # (2, B, 1) each
    assert back.shape == (2, 5, 1)
    assert back[0, :, 0].tolist() == lengths and back[1, :, 0].tolist() == [-n for n in lengths]


def test_f1_of_the_positive_class_counts_hits_false_alarms_and_misses():
    pred, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])  # 2 hits, 1 false alarm, 1 miss
    assert f1_binary(pred, labels) == 4 / 6
    assert f1_binary(1 - pred, 1 - labels) == 2 / 4  # the other class as positive: 1 hit, 1 each of the others
    assert f1_binary(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 1])) == 2 / 5  # 1 hit, 2 false alarms, 1 miss
    assert f1_binary(np.zeros(3), np.zeros(3)) == 0.0  # no positive anywhere: nothing to score


def test_a_report_gives_every_exit_and_threshold_an_interval_around_its_own_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    right = np.eye(2)[labels] * 4.0  # confident and right
    logits = np.stack([np.where(rng.random((400, 1)) < p, right, right[:, ::-1]) for p in (0.7, 0.8, 0.9)])  # exits right 70/80/90%
    report = report_from_logits(logits, labels)
    assert report["num_layers"] == 3 and [r["exit"] for r in report["per_exit"]] == [1, 2, 3]
    for row in report["per_exit"] + report["sweep"]:
        assert row["lo"] < row["accuracy"] < row["hi"] and row["hi"] - row["lo"] < 0.1
    assert [round(r["accuracy"], 1) for r in report["per_exit"]] == [0.7, 0.8, 0.9]


def test_each_exit_is_scored_as_if_every_row_left_there():
    logits = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # exit 1 predicts 0, 0, 1
                       [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # exit 2 predicts 1, 0, 1
    labels = np.array([1, 0, 1])
    rows = per_exit_metrics(logits, labels)
    assert [(r["exit"], r["accuracy"], r["f1"]) for r in rows] == [(1, 2 / 3, 2 / 3), (2, 1.0, 1.0)]
    three_labels = per_exit_metrics(np.concatenate([logits, np.zeros((2, 3, 1))], axis=-1), labels)
    assert "f1" not in three_labels[0]  # F1 of "class 1" means something for two labels only


def test_paired_per_exit_rows_only_when_both_models_have_the_same_exits():
    rng = np.random.default_rng(0)
    a, b, labels = rng.normal(size=(3, 40, 2)), rng.normal(size=(3, 40, 2)), rng.integers(0, 2, 40)
    paired = paired_report(a, b, labels)
    assert len(paired["per_exit"]) == 3
    assert paired["per_exit"][-1] == paired["full_depth"]  # the last exit forced is full depth
    assert {k: v for k, v in paired["sweep"][0].items() if k != "threshold"} == paired["full_depth"]  # and so is threshold 0
    assert paired["full_depth"]["difference"] == np.mean((a[-1].argmax(-1) == labels) * 1.0 - (b[-1].argmax(-1) == labels))
    assert paired_report(a, b[1:], labels)["per_exit"] == []
    assert paired_report(a, a, labels)["full_depth"] == {"difference": 0.0, "lo": 0.0, "hi": 0.0}


def test_exit_logits_come_back_in_the_splits_order_whatever_the_length_batches(tiny_backbone):
    torch.manual_seed(0)
    model = MultiExitBert.from_backbone(tiny_backbone, ["a", "b"])
    texts = ["a much longer text than the rest of them, with many words", "short", "a middling one", "ok", "fine film here"]
    split = TextEncoder(tiny_backbone / "tokenizer.json", 32).encode(texts)
    together = exit_logits(model, split, batch_size=2)  # three batches, sorted by length
    alone = np.concatenate([exit_logits(model, split.rows([i]), batch_size=1) for i in range(len(texts))], axis=1)
    assert together.shape == (model.num_layers, len(texts), 2)
    np.testing.assert_allclose(together, alone, atol=1e-5)
