"""On a GPU: the CUDA path really runs there (marker `gpu`; bench/gpu.py runs these first).

Skipped, with onnxruntime's own reason, wherever no CUDA provider loads (as on CI and the 2-core
development machine). The real-bundle test also needs ROMEBERT_GPU_BUNDLES=fp32_dir:fp16_dir
(bench/gpu.py exports them).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from romebert.core.bundle import load_bundle
from romebert.core.engine import DeviceError, Engine, resolve_device
from romebert.core.exits import exit_layers
from romebert.model_export.calibrate import exit_logits_onnx
from romebert.core.tokenization import LengthBatches, TextEncoder

pytestmark = pytest.mark.gpu
TEXTS = ["a gorgeous, witty film", "dull and far too long", "meh", "the cast is strong but the script is weak"]


@pytest.fixture(scope="module")
def cuda(tiny_bundle) -> None:
    try:
        resolve_device("cuda", probe=load_bundle(tiny_bundle).path("segments/embeddings.onnx"))
    except DeviceError as err:
        pytest.skip(f"no CUDA provider loads here: {str(err)[-300:]}")


def test_the_io_binding_path_on_cuda_answers_as_the_cpu_does_and_keeps_hidden_states_on_the_gpu(tiny_bundle, cuda):
    bundle = load_bundle(tiny_bundle)
    gpu, cpu = Engine(bundle, device="cuda"), Engine(bundle, device="cpu")
    assert gpu.io_binding and gpu.providers[0] == "CUDAExecutionProvider"
    batch = TextEncoder(bundle.tokenizer_file, bundle.max_length).encode(TEXTS)
    state = gpu.embed(batch)
    for i in range(gpu.num_layers):
        assert state.hidden.device_name().lower() == "cuda", "hidden states copied to the host between layers"
        state, _ = gpu.layer(i, state)
        if i == 0:
            state = gpu.keep(state, np.array([0, 2, 3]))  # the on-device row gather
    np.testing.assert_allclose(gpu.all_exit_logits(batch), cpu.all_exit_logits(batch), atol=5e-3)


def test_the_server_on_cuda_answers_and_says_where_it_runs(tiny_bundle, cuda):
    from fastapi.testclient import TestClient

    from romebert.service.app import create_app
    from romebert.service.settings import Settings

    with TestClient(create_app(Settings(bundle=str(tiny_bundle), device="cuda"))) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert ready.json()["device"] == "cuda"
        response = client.post("/classify", json={"text": TEXTS})
        assert response.status_code == 200 and len(response.json()["results"]) == len(TEXTS)
        assert 'device="cuda"' in client.get("/metrics").text


def test_fp16_on_cuda_keeps_the_accuracy_and_the_exits_of_fp32(cuda):
    if "ROMEBERT_GPU_BUNDLES" not in os.environ:
        pytest.skip("set ROMEBERT_GPU_BUNDLES=fp32_bundle:fp16_bundle (bench/gpu.py does)")
    from romebert.core.data import encode_examples, load_task

    fp32, fp16 = (load_bundle(p) for p in os.environ["ROMEBERT_GPU_BUNDLES"].split(":"))
    task = load_task(fp32.manifest["source"]["data"])
    encoded, labels = encode_examples(TextEncoder(fp32.tokenizer_file, fp32.max_length), task.dev[:512])
    split = LengthBatches.of(encoded, 64)
    logits = {name: exit_logits_onnx(Engine(bundle, device="cuda"), split) for name, bundle in (("fp32", fp32), ("fp16", fp16))}
    accuracy = {k: float((v[-1].argmax(-1) == labels).mean()) for k, v in logits.items()}
    assert abs(accuracy["fp16"] - accuracy["fp32"]) <= 0.005, accuracy
    same = (exit_layers(logits["fp16"], fp32.default_threshold) == exit_layers(logits["fp32"], fp32.default_threshold)).mean()
    assert same >= 0.99, f"only {same:.1%} of rows leave at the same exit in fp16"
