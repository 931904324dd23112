"""The bundle: what the manifest promises, that it computes what PyTorch computes, and refusals."""

from __future__ import annotations

import builtins
import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from romebert.model_export.calibrate import calibrate, choose_threshold, exit_logits_onnx
from romebert.model_export.export import export_bundle
from romebert.model_export.parity import ParityError, check_parity
from romebert.core.bundle import BundleError, load_bundle, sha256_file
from romebert.core.engine import Engine, run_early_exit
from romebert.core.exits import THRESHOLD_GRID, entropy, exit_layers
from romebert.core.tokenization import LengthBatches, TextEncoder
from romebert.training.model import MultiExitBert

TEXTS = ["a gorgeous, witty film", "dull and far too long , with a plot that never decides what it wants to be", "meh"]


def test_manifest_holds_every_field_of_contract_2(tiny_bundle, tiny_checkpoint):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    # which training run it holds, whatever the checkpoint folder holds later
    assert m["source"]["weights_sha256"] == sha256_file(tiny_checkpoint / "model.safetensors")
    assert m["format_version"] == 1 and m["labels"] == ["negative", "positive"]
    assert m["num_layers"] == 3 and m["max_length"] == 32 and m["precision"] == "fp32"
    assert [s["exit"] for s in m["segments"]] == [None, 1, 2, 3]
    for s in m["segments"]:
        assert sha256_file(tiny_bundle / s["file"]) == s["sha256"]
        assert s["inputs"] and s["outputs"]
    assert [r["threshold"] for r in m["calibration"]] == list(THRESHOLD_GRID)
    assert all({"accuracy", "avg_exit_layer", "speedup"} <= r.keys() for r in m["calibration"])
    assert m["default_threshold"] in THRESHOLD_GRID and "rule" in m["threshold_rule"]
    assert m["optimization"]["fused_operators"]["layer_1"]["Attention"] == 1, "attention must fuse"
    assert m["optimization"]["quantization"] is None


def test_every_segment_takes_any_batch_and_length_and_its_exit_gives_one_logit_per_label(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    hidden, labels = m["hidden_size"], len(m["labels"])
    expected = {"input_ids": ["batch", "sequence"], "token_type_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                "hidden_states": ["batch", "sequence", hidden], "next_hidden_states": ["batch", "sequence", hidden],
                "logits": ["batch", labels]}
    for s in m["segments"]:
        graph = onnx.load(str(tiny_bundle / s["file"]), load_external_data=False).graph
        assert ([v.name for v in graph.input], [v.name for v in graph.output]) == (s["inputs"], s["outputs"]), s["name"]
        shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
        assert shapes == {name: expected[name] for name in s["inputs"] + s["outputs"]}, s["name"]


def test_chained_segments_match_pytorch_at_every_exit(tiny_bundle, tiny_checkpoint):
    model = MultiExitBert.from_checkpoint(tiny_checkpoint, attn_implementation="eager")
    engine = Engine(load_bundle(tiny_bundle), device="cpu")
    batch = TextEncoder(tiny_bundle / "tokenizer.json", 32).encode(TEXTS)
    assert batch.attention_mask.min() == 0, "the check must include padding"
    with torch.no_grad():
        expected = model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()
    assert np.abs(engine.all_exit_logits(batch) - expected).max() < 1e-4
    report = check_parity(model, engine, [batch], strict=True)
    assert report["exit_layer_mismatches"] == 0 and report["examples"] == len(TEXTS)
    assert len(report["max_abs_error_per_segment"]) == engine.num_layers + 1  # the embeddings, then each layer with its exit
    assert max(report["max_abs_error_per_segment"]) < 1e-4 and report["max_abs_logit_error_chained"] < 1e-4


def test_offline_early_exit_follows_each_rows_own_threshold_and_zero_means_full_depth(tiny_bundle):
    engine = Engine(load_bundle(tiny_bundle), device="cpu")
    batch = TextEncoder(tiny_bundle / "tokenizer.json", 32).encode(TEXTS)
    every_exit = engine.all_exit_logits(batch)  # (L, B, C)
    rows = np.arange(len(TEXTS))
    # Each row's threshold sits just above its exit-1 entropy or at 0, so rows leave at 1 and at L.
    thresholds = np.where(rows % 2 == 0, entropy(every_exit[0]) + 1e-6, 0.0)
    for t in (np.zeros(len(TEXTS)), thresholds):
        logits, layers = run_early_exit(engine, batch, t)
        expected = np.array([exit_layers(every_exit[:, [r]], t[r])[0] for r in rows])
        assert layers.tolist() == expected.tolist()
        assert np.abs(logits - every_exit[layers - 1, rows]).max() < 1e-5
    assert run_early_exit(engine, batch, np.zeros(len(TEXTS)))[1].tolist() == [engine.num_layers] * len(TEXTS)
    assert layers.tolist() == [1, engine.num_layers, 1]


def test_parity_check_fails_loudly_when_the_model_differs(tiny_bundle, tiny_checkpoint):
    model = MultiExitBert.from_checkpoint(tiny_checkpoint, attn_implementation="eager")
    with torch.no_grad():
        model.exits[0].classifier.bias += 1.0
    engine = Engine(load_bundle(tiny_bundle), device="cpu")
    batch = TextEncoder(tiny_bundle / "tokenizer.json", 32).encode(TEXTS)
    with pytest.raises(ParityError, match="disagree"):
        check_parity(model, engine, [batch], strict=True)
    report = check_parity(model, engine, [batch], strict=False)  # as for int8: reported, not raised
    errors = report["max_abs_error_per_segment"]
    assert errors[1] == pytest.approx(1.0, abs=1e-3)  # the segment whose exit differs, and by how much
    assert max(errors[:1] + errors[2:]) < 1e-4  # each segment is checked on the same inputs: the fault stays in its own


def test_the_monolithic_graph_is_exported_only_on_request_and_equals_the_final_exit(tiny_bundle, tiny_checkpoint, tmp_path):
    from romebert.core.engine import open_session

    assert "full" not in load_bundle(tiny_bundle).manifest["extras"]
    bundle = load_bundle(export_bundle(tiny_checkpoint, tmp_path / "mono", limit=64, log=lambda *_: None, monolithic=True))
    batch = TextEncoder(bundle.tokenizer_file, 32).encode(TEXTS)
    full = open_session(bundle.path(bundle.manifest["extras"]["full"]["file"]))
    (logits,) = full.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "token_type_ids": batch.token_type_ids})
    assert np.abs(logits - Engine(bundle, device="cpu").all_exit_logits(batch)[-1]).max() < 1e-4


def test_int8_bundle_records_its_accuracy_and_quantized_weights(tiny_checkpoint, tmp_path):
    started = time.perf_counter()
    out = export_bundle(tiny_checkpoint, tmp_path / "int8", precision="int8", limit=64, log=lambda *_: None)
    took = time.perf_counter() - started
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["parity"]["tolerance"] is None
    assert m["optimization"]["quantization"] == "dynamic int8, per-channel"
    assert 0 < m["export_seconds"] <= took
    assert m["calibration"][0]["accuracy"] > 0
    ops = {n.op_type for n in onnx.load(str(out / m["segments"][1]["file"])).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear"}, ops


def test_auto_precision_measures_fp32_and_int8_and_publishes_the_chosen_files(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "auto", precision="auto", limit=64, log=lambda *_: None)
    bundle = load_bundle(out)  # checksums and all: the published folder is a whole bundle
    m = bundle.manifest
    onnxruntime_rows = {r["files"] for r in m["backends"] if r["backend"] == "onnxruntime"}
    assert onnxruntime_rows == {"fp32", "int8"}
    assert m["precision"] == m["backend"]["files"]
    chosen = next(r for r in m["backends"] if (r["backend"], r["precision"], r["files"]) == (m["backend"]["backend"], m["backend"]["precision"], m["backend"]["files"]))
    assert chosen["threshold"] == m["default_threshold"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto"], "the candidate not chosen leaves nothing behind"


def test_existing_output_is_refused_without_force_before_any_work_and_left_untouched(tiny_checkpoint, tiny_bundle, tmp_path):
    before = sha256_file(tiny_bundle / "manifest.json")
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(tiny_checkpoint, tiny_bundle, limit=64)
    with pytest.raises(FileExistsError, match="--force"):  # refused before the checkpoint is even looked at
        export_bundle(tmp_path / "no-such-checkpoint", tiny_bundle, limit=64)
    assert sha256_file(tiny_bundle / "manifest.json") == before


def test_missing_corrupt_and_foreign_checkpoints_are_refused_and_nothing_is_written(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        export_bundle(tmp_path / "nope", tmp_path / "b1")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load"):
        export_bundle(corrupt, tmp_path / "b2")
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_checkpoint, foreign)
    config = json.loads((foreign / "config.json").read_text()) | {"model_type": "gpt2"}
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture"):
        export_bundle(foreign, tmp_path / "b3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "foreign"]


@pytest.mark.parametrize("option,says", [
    ({"max_drop_points": -1.0}, "--max-accuracy-drop must be >= 0"),
    ({"parity_examples": 0}, "--parity-examples must be >= 1"),
])
def test_options_that_cannot_work_are_refused_before_any_export(tiny_checkpoint, tmp_path, option, says):
    with pytest.raises(ValueError, match=says):
        export_bundle(tiny_checkpoint, tmp_path / "out", **option)
    assert not any(tmp_path.iterdir())  # nothing exported, not even a temporary folder


def test_a_sigterm_mid_export_removes_its_temporary_folder_and_publishes_nothing(tiny_checkpoint, tmp_path):
    export = subprocess.Popen([sys.executable, "-m", "romebert.cli", "export", str(tiny_checkpoint), str(tmp_path / "out")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".out.*")):  # the export's temporary folder beside OUT: it is at work
        assert export.poll() is None and time.monotonic() < deadline, "the export never started"
        time.sleep(0.01)
    export.send_signal(signal.SIGTERM)
    assert export.wait(timeout=60) == 130 and "romebert export: interrupted" in export.stderr.read()
    assert not any(tmp_path.iterdir())


def test_cli_reports_errors_in_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "romebert.cli", "export", str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "checkpoint folder not found" in done.stderr


def test_a_checkpoint_given_for_a_bundle_is_refused_saying_how_to_make_one(tiny_checkpoint):
    with pytest.raises(BundleError, match=re.escape(
            f"{tiny_checkpoint}: not a model bundle (no manifest.json): it is a training checkpoint, which "
            f"`romebert export {tiny_checkpoint} BUNDLE` makes a bundle of")):
        load_bundle(tiny_checkpoint)


def test_server_side_check_refuses_tampered_or_unknown_bundles(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    segment = copy / json.loads((copy / "manifest.json").read_text())["segments"][2]["file"]
    segment.write_bytes(segment.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text()) | {"format_version": 99}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(copy)


@pytest.mark.parametrize("private", ["manifest.json", "segments"])
def test_a_bundle_this_user_cannot_read_is_refused_naming_the_file(tiny_bundle, tmp_path, monkeypatch, private):
    """As one built by another user whose files are private (what export's files were before they
    got the umask's modes). The tests may run as root, who reads anything: the refusal is simulated."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    unreadable = copy / "manifest.json" if private == "manifest.json" else copy / load_bundle(copy).segments[1].file
    real_open = io.open

    def open_as_another_user(file, *args, **kwargs):
        if Path(file) == unreadable:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_as_another_user)  # pathlib's
    monkeypatch.setattr(builtins, "open", open_as_another_user)
    with pytest.raises(BundleError, match=re.escape(f"{unreadable}: cannot be read (Permission denied)")):
        load_bundle(copy)


def test_mean_pooled_exits_export_with_parity(tiny_backbone, tmp_path):
    from tiny_backbone import tiny_train_config
    from romebert.training.train import train

    checkpoint = train(tiny_train_config(tiny_backbone, tmp_path / "mean", exit_pooling="mean", limit=32))
    out = export_bundle(checkpoint, tmp_path / "bundle", limit=32, log=lambda *_: None)
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["max_abs_logit_error_chained"] < 1e-4 and parity["exit_layer_mismatches"] == 0


def test_default_threshold_rule_picks_the_fastest_within_the_drop_and_never_above_ln_c():
    row = lambda t, accuracy, speedup: {"threshold": t, "accuracy": accuracy, "speedup": speedup}  # noqa: E731
    table = [  # as the sweep gives it, thresholds ascending; accuracies exact in binary
        row(0.0, 0.75, 1.0),  # full depth: what the drop is measured from
        row(0.1, 0.5, 1.5),
        row(0.2, 0.75, 2.0),
        row(0.25, 0.75, 2.0),  # as fast as 0.2: the smaller threshold wins the tie
        row(0.3, 0.5, 3.0),
        row(math.log(2), 0.5, 5.0),  # exactly ln 2: still a threshold a client may send
        row(0.7, 0.75, 6.0),  # above ln 2: not for two labels
    ]
    assert choose_threshold(table, 1.0, num_labels=2)["threshold"] == 0.2
    assert choose_threshold(table, 25.0, num_labels=2)["threshold"] == math.log(2)  # 25 points: 0.5 is exactly at the bound
    assert choose_threshold(table, 1.0, num_labels=3)["threshold"] == 0.7


def test_calibration_caps_the_default_at_ln_of_the_number_of_labels_not_of_exits():
    # 3 exits, 2 labels, both rows right everywhere: exit 1 is nearly uniform (entropy just under
    # ln 2), exits 2-3 sure (entropy 0.04). Only 0.7 sends them out at exit 1, and 0.7 > ln 2.
    exits = np.array([[[0.01, 0.0]] * 2, [[5.0, 0.0]] * 2, [[5.0, 0.0]] * 2])
    table, default = calibrate(exits, np.zeros(2, dtype=int), max_drop_points=1.0)
    assert next(r for r in table if r["threshold"] == 0.7)["speedup"] == 3.0
    assert default["threshold"] == 0.05  # the first that lets them out at exit 2 (1.5x)


def test_calibration_logits_put_every_batchs_rows_back_in_split_order(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    engine = Engine(bundle, device="cpu")
    texts = ["a much longer review than the others, with many words in it", "short", "a middling one here", "ok", "fine film"]
    split = TextEncoder(bundle.tokenizer_file, bundle.max_length).encode(texts)
    batches = LengthBatches.of(split, 2)  # three batches, sorted by length: not the split's order
    assert len(batches.batches) == 3 and not np.array_equal(batches.order, np.arange(len(texts)))
    together = exit_logits_onnx(engine, batches)
    alone = np.concatenate([engine.all_exit_logits(split.rows(np.array([i]))) for i in range(len(texts))], axis=1)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_fp16_bundle_keeps_fp32_inputs_and_outputs_and_agrees_closely(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "fp16", precision="fp16", limit=32, log=lambda *_: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    graph = onnx.load(str(out / m["segments"][1]["file"])).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer), "weights are fp16"
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, "the engine feeds fp32 hidden states"
    assert m["parity"]["max_abs_logit_error_chained"] < 1e-2
