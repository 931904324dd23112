"""`romebert serve`: settings from env and flags, refusing a bad bundle, and the real HTTP path
with uvicorn, including a graceful SIGTERM that answers the request in flight and exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from romebert.service.cli import main
from romebert.service.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]


def test_settings_come_from_defaults_then_env_then_flags():
    env = {"ROMEBERT_BUNDLE": "/b", "ROMEBERT_PORT": "9000", "ROMEBERT_MAX_BATCH": "8", "ROMEBERT_MAX_WAIT_MS": "0.5"}
    s = Settings.from_env(env, max_batch=16, threads=None)
    assert (s.bundle, s.port, s.max_batch, s.max_wait_ms, s.host, s.device) == ("/b", 9000, 16, 0.5, "0.0.0.0", "auto")


@pytest.mark.parametrize(
    "name,value,says",
    [("PORT", "http", "ROMEBERT_PORT"), ("MAX_BATCH", "0", "max_batch"), ("DEVICE", "tpu", "device"), ("MAX_ITEMS", "5000", "max_items"), ("WORKERS", "0", "workers")],
)
def test_a_bad_setting_is_refused_with_its_name(name, value, says):
    with pytest.raises(SettingsError, match=says):
        Settings.from_env({f"ROMEBERT_{name}": value})


def test_workers_share_the_cores_unless_threads_are_given(tiny_bundle):
    from romebert.core.bundle import load_bundle
    from romebert.core.engine import default_threads
    from romebert.service.runtime import default_engine

    bundle = load_bundle(tiny_bundle)
    assert default_engine(bundle, Settings(device="cpu", workers=2)).threads == max(default_threads() // 2, 1)
    assert default_engine(bundle, Settings(device="cpu", workers=2, threads=3)).threads == 3


def test_serve_without_a_bundle_stops_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv("ROMEBERT_BUNDLE", raising=False)
    assert main("serve", []) == 2
    assert "no model bundle" in capsys.readouterr().err


def test_serve_refuses_a_corrupt_bundle_before_starting(tiny_bundle, tmp_path, capsys):
    corrupt = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    segment = corrupt / json.loads((corrupt / "manifest.json").read_text())["segments"][1]["file"]
    segment.write_bytes(segment.read_bytes()[:-1] + b"\0")
    assert main("serve", [str(corrupt), "--port", "1"]) == 2  # port 1 would fail: it never gets that far
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 does not match" in err


def test_serve_refuses_an_unknown_format_version(tiny_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    assert main("serve", [str(bundle)]) == 2
    assert "format_version 99" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_answers_over_http_and_drains_on_sigterm(tiny_bundle):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A 3 s batching window keeps a lone request queued long enough to be in flight at SIGTERM.
    command = [sys.executable, "-m", "romebert.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1", "--port", str(port),
               "--threads", "1", "--max-wait-ms", "3000", "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, env=os.environ | {"ROMEBERT_BUNDLE": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)

        with httpx.Client(base_url=base, timeout=30) as client:
            ok = client.post("/classify", json={"text": ["great", "awful"], "entropy_threshold": 0.0, "latency_budget_ms": 10000})
            assert ok.status_code == 200 and [r["exit_layer"] for r in ok.json()["results"]] == [3, 3]
            assert client.post("/classify", json={"text": " "}).json()["error"]["code"] == "invalid_request"
            assert "romebert_exit_layer_bucket" in client.get("/metrics").text

        answer: dict = {}
        in_flight = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{base}/classify", json={"text": "last one"}, timeout=30)))
        in_flight.start()
        deadline = time.monotonic() + 10
        while "romebert_queue_depth 1.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        in_flight.join(timeout=30)
        assert server.wait(timeout=30) == 0, server.stdout.read()
        assert answer["r"].status_code == 200 and len(answer["r"].json()["results"]) == 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
