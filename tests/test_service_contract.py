"""The running server against its own OpenAPI schema: schemathesis, every check, on the tiny bundle.

Positive and negative data, the schema's coverage cases, undeclared methods, status codes,
content types and response schemas: whatever the schema says is what the server does. Run as the
schemathesis CLI against a real `romebert serve`, as a user would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from test_service_server import free_port

TESTS = Path(__file__).resolve().parent


def test_schemathesis_with_every_check_finds_nothing(tiny_bundle):
    port = free_port()
    command = [sys.executable, "-m", "romebert.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1", "--port", str(port),
               "--threads", "1", "--log-level", "warning"]
    server = subprocess.Popen(command, env=os.environ | {"ROMEBERT_BUNDLE": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
        schemathesis = Path(sys.executable).with_name("schemathesis")
        run = subprocess.run([str(schemathesis), "--config-file", str(TESTS / "schemathesis.toml"), "run",
                              f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-examples", "300", "--seed", "1",
                              "--warnings", "off"], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-6000:]
        assert "No issues found" in run.stdout and " passed" in run.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
