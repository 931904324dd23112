"""Backends: OpenVINO's CPU plugin against onnxruntime's own, shape buckets, and the export's choice."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from romebert.core import engine as engine_module
from romebert.core.bundle import load_bundle
from romebert.core.engine import Engine, openvino_device, run_early_exit
from romebert.core.tokenization import TextEncoder
from romebert.service.cost_model import EwmaCostModel, warm_up
from romebert.service.runtime import default_engine
from romebert.service.settings import Settings

TEXTS = ["a fine film", "dull", "the cast is strong but the script is weak and the plot goes nowhere at all", "meh", "superb"]
needs_openvino = pytest.mark.skipif(openvino_device() is None, reason="OpenVINO offers no CPU device here (onnxruntime-ep-openvino not installed, or its plugin lists no device on this CPU)")


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, TextEncoder(bundle.tokenizer_file, bundle.max_length), Engine(bundle, device="cpu")


@needs_openvino
def test_openvino_in_f32_answers_as_onnxruntime_through_keep_and_merge(engines):
    bundle, encoder, reference = engines
    openvino = Engine(bundle, backend="openvino", precision="f32")
    batch = encoder.encode(TEXTS)
    np.testing.assert_allclose(openvino.all_exit_logits(batch), reference.all_exit_logits(batch), atol=1e-5)

    def survivors_merged_with_a_newcomer(engine) -> np.ndarray:
        state, _ = engine.layer(0, engine.embed(batch))
        state = engine.keep(state, [1, 3])
        other, _ = engine.layer(0, engine.embed(encoder.encode(["another long review that says many things about the movie"])))
        state = engine.merge([state, other])
        assert len(state) == 3
        return np.stack([engine.layer(i, state)[1] for i in range(1, engine.num_layers)][:1])

    np.testing.assert_allclose(survivors_merged_with_a_newcomer(openvino), survivors_merged_with_a_newcomer(reference), atol=1e-5)
    for threshold in (0.0, 0.3, 0.69):
        t = np.full(len(TEXTS), threshold)
        assert np.array_equal(run_early_exit(openvino, batch, t)[1], run_early_exit(reference, batch, t)[1])


@needs_openvino
def test_openvino_pads_every_batch_to_a_listed_shape_and_the_warm_up_runs_them_all(engines):
    bundle, encoder, _ = engines
    openvino = Engine(bundle, backend="openvino", precision="bf16")
    listed = set(openvino.shapes(32, bundle.max_length))
    assert all(openvino._bucket(n, w) in listed for n in range(1, 33) for w in range(1, bundle.max_length + 1))
    seen = []
    layer = openvino.layer

    def recording(i, state):
        seen.append(state.attention_mask.shape)
        return layer(i, state)

    openvino.layer = recording
    warm_up(openvino, EwmaCostModel(openvino.num_layers), 32, bundle.max_length)
    assert listed <= set(seen)
    assert Engine(bundle, device="cpu").shapes(32, 32) is None  # onnxruntime takes any shape as it comes


def test_the_export_measures_every_backend_and_records_its_choice(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    measured = {(r["backend"], r["precision"]) for r in manifest["backends"]}
    assert ("onnxruntime", "fp32") in measured
    if openvino_device() is not None:
        assert {("openvino", "bf16"), ("openvino", "f32")} <= measured
    chosen = manifest["backend"]
    row = next(r for r in manifest["backends"] if (r["backend"], r["precision"]) == (chosen["backend"], chosen["precision"]))
    assert row["eligible"] and row["exit_agreement"] >= 0.99
    assert row["items_per_s"] == max(r["items_per_s"] for r in manifest["backends"] if r["eligible"])


def test_serve_auto_takes_the_bundles_choice_and_says_so_when_it_cannot(tiny_bundle, tmp_path, monkeypatch, caplog):
    folder = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"backend": {"backend": "openvino", "precision": "f32"}}))
    bundle = load_bundle(folder)
    if openvino_device() is not None:
        assert default_engine(bundle, Settings(device="cpu")).backend == "openvino"
    monkeypatch.setattr(engine_module, "_openvino", None)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime_ep_openvino", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="romebert.runtime"):
        assert default_engine(bundle, Settings(device="cpu")).backend == "onnxruntime"
    assert "OpenVINO, which offers no CPU device here" in caplog.text
