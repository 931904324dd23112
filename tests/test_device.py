"""The device the server says it runs on is the device it runs on (DESIGN.md: no silent CPU fall-back).

Without a GPU the fall-back is faked: onnxruntime is made to list a CUDA provider that this
(CPU) build cannot load, so a CUDA session comes back on the CPU provider exactly as it does on a
host whose CUDA libraries are missing.
"""

from __future__ import annotations

import logging
import os

import onnxruntime
import pytest

from romebert.core.bundle import load_bundle
from romebert.core.engine import DeviceError, Engine, open_session
from romebert.service.cli import main


@pytest.fixture
def fake_cuda(monkeypatch):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: the fall-back cannot be faked here")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_cuda_asked_for_on_an_onnxruntime_without_it_exits_2_saying_what_to_install(tiny_bundle, capsys):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    assert main("serve", [str(tiny_bundle), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "install onnxruntime-gpu" in err


def test_a_session_that_falls_back_to_the_cpu_is_refused_with_onnxruntimes_reason(tiny_bundle, fake_cuda, capfd):
    segment = load_bundle(tiny_bundle).path("segments/embeddings.onnx")
    with pytest.raises(DeviceError, match=r"not on CUDA: .*CUDAExecutionProvider"):
        open_session(segment, "cuda")
    os.write(2, b"stderr is back\n")  # onnxruntime's log was captured from file descriptor 2: it must be given back
    assert "stderr is back" in capfd.readouterr().err


def test_serve_with_device_cuda_exits_2_on_a_silent_fall_back(tiny_bundle, fake_cuda, capsys):
    assert main("serve", [str(tiny_bundle), "--device", "cuda", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not on CUDA" in err and "CPUExecutionProvider" in err


def test_device_auto_uses_cuda_only_when_a_probe_session_really_gets_it(tiny_bundle, fake_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="romebert.engine"):
        engine = Engine(load_bundle(tiny_bundle), device="auto")
    assert engine.device == "cpu" and engine.providers == ["CPUExecutionProvider"]
    assert "CUDA does not work here, serving on the CPU" in caplog.text
