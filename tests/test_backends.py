"""Backends: OpenVINO's CPU plugin against onnxruntime's own, shape buckets, and the export's choice."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from romebert.core import engine as engine_module
from romebert.core.bundle import load_bundle
from romebert.core.engine import Engine, OpenVinoSession, open_openvino_session, openvino_available, run_early_exit
from romebert.core.tokenization import TextEncoder
from romebert.model_export import backends
from romebert.service.cohorts import BatchLimit
from romebert.service.cost_model import EwmaCostModel, warm_up
from romebert.service import runtime as runtime_module
from romebert.service.runtime import default_engine
from romebert.service.settings import Settings

TEXTS = ["a fine film", "dull", "the cast is strong but the script is weak and the plot goes nowhere at all", "meh", "superb"]
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO offers no CPU device here (neither onnxruntime-ep-openvino nor openvino installed, or this CPU unsupported)")
needs_openvino_runtime = pytest.mark.skipif(engine_module._openvino_core() is None, reason="OpenVINO's own runtime (PyPI openvino) is not installed or sees no CPU")


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, TextEncoder(bundle.tokenizer_file, bundle.max_length), Engine(bundle, device="cpu")


@pytest.fixture(params=["onnxruntime, bucketed", pytest.param("openvino", marks=needs_openvino)])
def bucketed(request, engines):
    """An engine that pads every batch to a shape bucket: OpenVINO always, onnxruntime when asked."""
    bundle = engines[0]
    if request.param == "openvino":
        return Engine(bundle, backend="openvino", precision="f32")
    return Engine(bundle, device="cpu", buckets=True)


def test_a_bucketed_engine_answers_as_the_plain_one_through_keep_and_merge(engines, bucketed):
    bundle, encoder, reference = engines
    batch = encoder.encode(TEXTS)
    np.testing.assert_allclose(bucketed.all_exit_logits(batch), reference.all_exit_logits(batch), atol=1e-5)

    def survivors_merged_with_a_newcomer(engine) -> np.ndarray:
        state, _ = engine.layer(0, engine.embed(batch))
        state = engine.keep(state, [1, 3])
        other, _ = engine.layer(0, engine.embed(encoder.encode(["another long review that says many things about the movie"])))
        state = engine.merge([state, other])
        assert len(state) == 3
        return np.stack([engine.layer(i, state)[1] for i in range(1, engine.num_layers)])

    np.testing.assert_allclose(survivors_merged_with_a_newcomer(bucketed), survivors_merged_with_a_newcomer(reference), atol=1e-5)
    for threshold in (0.0, 0.3, 0.69):
        t = np.full(len(TEXTS), threshold)
        assert np.array_equal(run_early_exit(bucketed, batch, t)[1], run_early_exit(reference, batch, t)[1])


def test_a_bucketed_engine_runs_only_listed_shapes_and_the_warm_up_runs_them_all(engines, bucketed):
    bundle, encoder, _ = engines
    listed = set(bucketed.shapes(32, bundle.max_length))
    seen = []
    layer = bucketed.layer

    def recording(i, state):
        seen.append(state.attention_mask.shape)
        return layer(i, state)

    bucketed.layer = recording
    warm_up(bucketed, EwmaCostModel(bucketed.num_layers), BatchLimit(32, math.inf, bucketed.padded_shape), bundle.max_length)
    assert listed <= set(seen)
    seen.clear()
    for n in (1, 3, 5, 7, 13, 32):  # batches of many sizes and widths; every other row leaves at exit 1 (entropy < ln 2 < 0.7)
        texts = [" ".join(["word"] * (1 + 7 * k)) for k in range(n)]
        layers = run_early_exit(bucketed, encoder.encode(texts), np.where(np.arange(n) % 2 == 0, 0.7, 0.0))[1]
        assert layers.tolist() == [1 if k % 2 == 0 else bucketed.num_layers for k in range(n)]
    assert set(seen) <= listed
    assert Engine(bundle, device="cpu").shapes(32, 32) is None  # onnxruntime takes any shape as it comes


def test_a_bucketed_engine_pads_no_batch_of_up_to_8_rows_and_no_larger_one_by_more_than_a_quarter_of_its_rows(engines, bucketed):
    # the copies of the last row that fill a bucket are computed like real rows
    for n in range(1, 129):
        rows = bucketed.padded_shape(n, 16)[0]
        assert n <= rows <= n + n // 4 and (n > 8 or rows == n), n


def test_onnxruntime_computes_in_its_bundles_precision_whatever_openvinos_is_set_to(engines):
    bundle = engines[0]
    assert Engine(bundle, device="cpu", precision="bf16").precision == bundle.precision == "fp32"


def test_buckets_pad_on_the_host_so_they_refuse_io_binding(engines):
    with pytest.raises(ValueError, match="io_binding"):
        Engine(engines[0], device="cpu", buckets=True, io_binding=True)


def test_the_export_measures_every_backend_and_records_its_choice(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    measured = {(r["backend"], r["precision"]) for r in manifest["backends"]}
    assert ("onnxruntime", "fp32") in measured
    if openvino_available():
        assert {("openvino", "bf16"), ("openvino", "f32")} <= measured
    chosen = manifest["backend"]
    row = next(r for r in manifest["backends"] if (r["backend"], r["precision"]) == (chosen["backend"], chosen["precision"]))
    assert row["eligible"] and row["exit_agreement"] >= 0.99
    assert row["items_per_s"] == max(r["items_per_s"] for r in manifest["backends"] if r["eligible"])
    assert all(r["lone_row_p50_ms"] > 0 for r in manifest["backends"] if "error" not in r)  # what a lone request pays, shown beside
    # its dev accuracy at full depth is the calibration's (same files, same split), and the PyTorch
    # reference's is the same to within a row
    fp32 = next(r for r in manifest["backends"] if (r["backend"], r["precision"]) == ("onnxruntime", "fp32"))
    full_depth = next(r for r in manifest["calibration"] if r["threshold"] == 0.0)["accuracy"]
    assert fp32["dev_accuracy"] == full_depth
    assert abs(chosen["reference_dev_accuracy"] - full_depth) <= 1 / manifest["threshold_rule"]["examples"]


def test_a_backend_is_eligible_only_with_both_its_accuracy_and_its_exits_within_bounds():
    at_drop = 0.75 - backends.MAX_ACCURACY_DROP
    assert backends.eligible(at_drop, backends.MIN_EXIT_AGREEMENT, 0.75)  # both exactly at their bounds
    assert not backends.eligible(np.nextafter(at_drop, 0), 1.0, 0.75)
    assert not backends.eligible(0.75, np.nextafter(backends.MIN_EXIT_AGREEMENT, 0), 0.75)
    assert not backends.eligible(0.80, 0.909, 0.75)  # more accurate, but exits elsewhere (int8 on the default model)


def test_the_choice_is_the_fastest_eligible_else_the_first_that_loaded():
    def row(backend, precision, items_per_s, ok, error=None):
        return {"backend": backend, "precision": precision, "files": "fp32", "items_per_s": items_per_s, "eligible": ok} | (
            {"error": error} if error else {})

    fp32, int8, bf16 = row("onnxruntime", "fp32", 500, True), row("onnxruntime", "int8", 900, False), row("openvino", "bf16", 700, True)
    assert backends.choose([fp32, int8, bf16])["precision"] == "bf16"
    broken = row("onnxruntime", "fp32", 0, False, error="BundleError: cannot load")
    assert backends.choose([broken, int8, row("openvino", "f32", 400, False)])["precision"] == "int8"


def test_the_export_names_a_faster_candidate_turned_away_for_its_exits_alone_and_no_other():
    def row(backend, precision, files, items_per_s, accuracy, agreement):
        return {"backend": backend, "precision": precision, "files": files, "items_per_s": items_per_s,
                "dev_accuracy": accuracy, "exit_agreement": agreement, "threshold": 0.3, "lone_row_p50_ms": 2.0,
                "eligible": backends.eligible(accuracy, agreement, 0.8265)}

    bf16 = row("openvino", "bf16", "fp32", 644, 0.8253, 0.999)
    int8 = row("onnxruntime", "int8", "int8", 1093, 0.8288, 0.913)  # the default model, measured
    slower = row("onnxruntime", "fp32", "fp32", 477, 0.8265, 1.0)
    inaccurate = row("openvino", "bf16", "int8", 2000, 0.80, 0.90)  # faster, but its accuracy fails too
    unloaded = {"backend": "openvino", "precision": "f32", "files": "int8", "error": "BundleError: x", "eligible": False}
    rows = [slower, int8, bf16, inaccurate, unloaded]
    choice = backends.choose(rows) | {"reference_dev_accuracy": 0.8265}
    assert choice["backend"] == "openvino"
    ((named, speed_up),) = backends.faster_but_for_exits(rows, choice)
    assert named is int8 and speed_up == pytest.approx(1093 / 644)
    lines = []
    backends.report(rows, choice, lines.append)
    assert lines[-2] == "  chosen: openvino/bf16 on the fp32 files"
    assert lines[-1].startswith("  not chosen: onnxruntime/int8, 1.70x") and "8.7% of dev rows" in lines[-1]
    assert "romebert export --precision int8, romebert serve --backend onnxruntime " in lines[-1]
    assert backends.serve_flags(bf16) == "--backend openvino --openvino-precision bf16"
    # nothing to name when the fastest is the choice
    assert backends.faster_but_for_exits([bf16, slower], backends.choose([bf16, slower]) | {"reference_dev_accuracy": 0.8265}) == []


def test_serve_auto_takes_the_bundles_choice_and_says_so_when_it_cannot(tiny_bundle, tmp_path, monkeypatch, caplog):
    folder = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"backend": {"backend": "openvino", "precision": "f32"}}))
    bundle = load_bundle(folder)
    if openvino_available():
        assert default_engine(bundle, Settings(device="cpu")).backend == "openvino"
    monkeypatch.setattr(engine_module, "_openvino", None)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime_ep_openvino", None)  # as if neither were installed
    monkeypatch.setattr(engine_module, "_openvino_core", lambda: None)
    with caplog.at_level(logging.WARNING, logger="romebert.runtime"):
        assert default_engine(bundle, Settings(device="cpu")).backend == "onnxruntime"
    assert "OpenVINO, which offers no CPU device here" in caplog.text


def test_workers_sharing_an_openvino_engine_get_a_stream_each_with_their_share_of_the_cores(tiny_bundle, monkeypatch):
    # OpenVINO runs the calls of one stream one after another: with one stream, two workers took
    # turns on one core's worth of threads (docs/results.md, "Workers on OpenVINO").
    opened = []

    def spy(path, precision, threads, streams=1):
        opened.append((threads, streams))
        return engine_module.open_session(path, "cpu", threads)

    monkeypatch.setattr(engine_module, "open_openvino_session", spy)
    monkeypatch.setattr(runtime_module, "default_threads", lambda: 4)  # four cores
    bundle = load_bundle(tiny_bundle)
    for workers, expected in ((1, (4, 1)), (2, (2, 2)), (4, (1, 4))):
        opened.clear()
        default_engine(bundle, Settings(device="cpu", backend="openvino", workers=workers))
        assert set(opened) == {expected}


@needs_openvino_runtime
def test_where_the_plugin_offers_no_cpu_openvinos_own_runtime_runs_the_segments(tiny_bundle, monkeypatch):
    """onnxruntime's OpenVINO plugin offers Intel CPUs only; elsewhere (AMD) the same segments
    run on OpenVINO's own runtime, calls at once each on a request of its own."""
    monkeypatch.setattr(engine_module, "_openvino", False)  # the plugin lists no device, as on an AMD EPYC
    bundle = load_bundle(tiny_bundle)
    native = Engine(bundle, backend="openvino", precision="f32")
    assert native.providers == ["OpenVINO (runtime, CPU)"]
    reference = Engine(bundle, device="cpu")
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    batch = encoder.encode(TEXTS)
    np.testing.assert_allclose(native.all_exit_logits(batch), reference.all_exit_logits(batch), atol=1e-5)

    session = open_openvino_session(bundle.path(bundle.segments[1].file), "f32", threads=1, streams=2)
    assert isinstance(session, OpenVinoSession)
    state = reference.embed(batch)
    feeds = {"hidden_states": state.hidden, "attention_mask": state.attention_mask}
    first = session.run(None, feeds)
    other_state = reference.embed(encoder.encode(TEXTS[::-1]))  # the same shape, other rows
    session.run(None, {"hidden_states": other_state.hidden, "attention_mask": other_state.attention_mask})
    np.testing.assert_allclose(first[1], reference.layer(0, state)[1], atol=1e-5)  # a later call did not overwrite them
    with ThreadPoolExecutor(2) as pool:  # two threads at once, each on its own request
        results = list(pool.map(lambda _: session.run(["logits"], feeds)[0], range(8)))
    for logits in results:
        np.testing.assert_allclose(logits, first[1], atol=1e-6)


@needs_openvino_runtime
def test_openvinos_own_runtime_answers_right_whatever_the_order_of_shapes_and_the_layout_of_inputs(tiny_bundle, monkeypatch):
    """Inputs go to OpenVINO in place; a later call that is larger, strided, read-only or of another
    integer type must neither read nor write what an earlier call left in the request."""
    monkeypatch.setattr(engine_module, "_openvino", False)
    bundle = load_bundle(tiny_bundle)
    reference = Engine(bundle, device="cpu")
    encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
    session = open_openvino_session(bundle.path(bundle.segments[1].file), "f32", threads=1)
    small = reference.embed(encoder.encode(TEXTS[:1]))
    large = reference.embed(encoder.encode(TEXTS * 8))
    strided = {"hidden_states": np.repeat(large.hidden, 2, axis=0)[::2], "attention_mask": large.attention_mask.astype(np.int32)}
    assert not strided["hidden_states"].flags.c_contiguous
    read_only = {"hidden_states": small.hidden.copy(), "attention_mask": small.attention_mask.copy()}
    for array in read_only.values():
        array.flags.writeable = False
    for state, feeds in [(small, None), (large, strided), (small, read_only), (large, None)]:
        feeds = feeds or {"hidden_states": state.hidden, "attention_mask": state.attention_mask}
        np.testing.assert_allclose(session.run(["logits"], feeds)[0], reference.layer(0, state)[1], atol=1e-5)


class _CountingCompiled:
    """An OpenVINO compiled model that counts the infer requests made of it."""

    def __init__(self, compiled):
        self.compiled, self.requests = compiled, 0
        self.inputs, self.outputs = compiled.inputs, compiled.outputs

    def create_infer_request(self):
        self.requests += 1
        return self.compiled.create_infer_request()


@needs_openvino_runtime
def test_the_worker_thread_calls_openvino_on_the_request_the_loading_thread_warmed(tiny_bundle, monkeypatch):
    """A request grows its buffers with the shapes it runs: the warm-up's request (made in the
    loading thread) must be the one a later thread serves with, not a cold one of its own; a
    second request is made only for a call while the first is busy."""
    monkeypatch.setattr(engine_module, "_openvino", False)
    bundle = load_bundle(tiny_bundle)
    session = open_openvino_session(bundle.path(bundle.segments[1].file), "f32", threads=1, streams=2)
    session._compiled = counting = _CountingCompiled(session._compiled)
    reference = Engine(bundle, device="cpu")
    state = reference.embed(TextEncoder(bundle.tokenizer_file, bundle.max_length).encode(TEXTS))
    feeds = {"hidden_states": state.hidden, "attention_mask": state.attention_mask}
    expected = reference.layer(0, state)[1]
    for _ in range(3):  # one thread after another, as the loading thread and then the worker
        with ThreadPoolExecutor(1) as pool:
            np.testing.assert_allclose(pool.submit(session.run, ["logits"], feeds).result()[0], expected, atol=1e-5)
    assert counting.requests == 1

    busy = threading.Barrier(2)

    def at_once(_):  # two calls in flight together: each needs a request of its own
        busy.wait()
        return session.run(["logits"], feeds)[0]

    with ThreadPoolExecutor(2) as pool:
        for logits in pool.map(at_once, range(2)):
            np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert counting.requests <= 2


def test_backend_openvino_with_neither_runtime_installed_says_what_to_install(tiny_bundle, monkeypatch):
    monkeypatch.setattr(engine_module, "_openvino", False)
    monkeypatch.setattr(engine_module, "_openvino_core", lambda: None)
    with pytest.raises(engine_module.DeviceError, match=r"pip install 'romebert\[openvino\]'"):
        Engine(load_bundle(tiny_bundle), backend="openvino")


@needs_openvino_runtime
def test_a_segment_openvinos_own_runtime_cannot_read_raises_a_bundle_error_naming_the_file(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "_openvino", False)
    bundle = load_bundle(tiny_bundle)
    segment = bundle.path(bundle.segments[1].file)
    truncated = tmp_path / "layer_01.onnx"
    truncated.write_bytes(segment.read_bytes()[:2000])
    with pytest.raises(engine_module.BundleError, match=f"{truncated}: OpenVINO cannot load it"):
        open_openvino_session(truncated, "f32", threads=1)
