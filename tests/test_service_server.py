"""`romebert serve`: settings from env and flags, refusing a bad bundle, and the real HTTP path
with uvicorn: slow clients, clients that leave, a dead worker, a bundle that cannot load, and a
graceful SIGTERM that answers the request in flight and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
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

from gated_engine import Gated
from romebert.service import cli as service_cli
from romebert.service.cli import build_server, main
from romebert.service.loop_lag import LoopLag
from romebert.service.runtime import default_engine
from romebert.service.settings import Settings, SettingsError
from romebert.service.tickets import Rejected

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


def test_on_off_settings_read_the_usual_spellings():
    for raw, spin in (("1", True), ("true", True), (" Yes ", True), ("on", True), ("0", False), ("false", False), ("NO", False), ("off", False)):
        assert Settings.from_env({"ROMEBERT_SPIN": raw}).spin is spin, raw
    with pytest.raises(SettingsError, match="ROMEBERT_SPIN"):
        Settings.from_env({"ROMEBERT_SPIN": "maybe"})


def test_an_empty_variable_is_unset_and_a_flag_left_out_keeps_the_variable():
    s = Settings.from_env({"ROMEBERT_PORT": "", "ROMEBERT_MAX_WAIT_MS": "2.5", "ROMEBERT_HOST": "127.0.0.1"}, max_wait_ms=None)
    assert (s.port, s.max_wait_ms, s.host) == (8000, 2.5, "127.0.0.1")


@pytest.mark.parametrize("values", [
    *({name: 0} for name in ("port", "workers", "threads", "max_batch", "max_batch_tokens", "max_queue", "max_items", "max_body_bytes")),
    *({name: 0.0} for name in ("max_queue_wait_ms", "max_loop_lag_ms", "request_timeout_s", "header_timeout_s", "body_timeout_s",
                               "keep_alive_s", "graceful_timeout_s")),
    {"port": 65536},
    {"max_wait_ms": -0.1},
    {"max_wait_ms": 250.0, "max_queue_wait_ms": 250.0},  # a batching window as long as the wait bound
    {"max_items": 65, "max_queue": 64},  # a request that could never be queued
    {"pad_slack": 0.99},  # a batch cannot hold fewer tokens than its rows have
    {"pad_slack": math.nan},
    {"engine_nice": -1},  # above the event loop: the loop would starve instead
    {"engine_nice": 20},
])
def test_settings_out_of_range_are_refused(values):
    with pytest.raises(SettingsError, match=next(iter(values))):
        Settings(**values)


def test_the_edges_of_every_range_are_accepted():
    Settings(port=1, workers=1, threads=1, max_batch=1, max_batch_tokens=1, max_queue=1, max_items=1, max_body_bytes=1, max_wait_ms=0.0,
             max_queue_wait_ms=0.001, max_loop_lag_ms=0.001, request_timeout_s=0.001, header_timeout_s=0.001, body_timeout_s=0.001,
             keep_alive_s=0.001, graceful_timeout_s=0.001, pad_slack=1.0, engine_nice=0)
    Settings(port=65535, engine_nice=19)


@pytest.mark.parametrize("cores, workers, threads", [(2, 2, 1), (8, 2, 4), (2, 4, 1)])
def test_workers_share_the_cores_each_with_at_least_one_thread_unless_threads_are_given(tiny_bundle, monkeypatch, cores, workers, threads):
    from romebert.core.bundle import load_bundle
    from romebert.service import runtime

    bundle = load_bundle(tiny_bundle)
    monkeypatch.setattr(runtime, "default_threads", lambda: cores)
    assert runtime.default_engine(bundle, Settings(device="cpu", workers=workers)).threads == threads
    assert runtime.default_engine(bundle, Settings(device="cpu", workers=workers, threads=3)).threads == 3


SPIN_OFF_ENGINE = """
import sys, numpy as np
from romebert.core.bundle import load_bundle
from romebert.core.engine import set_pool_spinning
from romebert.core.tokenization import TextEncoder
from romebert.service.runtime import default_engine
from romebert.service.settings import Settings
bundle = load_bundle(sys.argv[1])
# onnxruntime named: the pools are its; with "auto" the tiny bundle's export may have timed OpenVINO faster
engine = default_engine(bundle, Settings(device="cpu", backend="onnxruntime", threads=2, spin=False))
options = engine._embeddings.get_session_options()
print(options.get_session_config_entry("session.intra_op.allow_spinning"), options.use_per_session_threads, options.intra_op_num_threads)
try:
    set_pool_spinning(True)
except RuntimeError as err:
    print("refused:", err)
encoded = TextEncoder(bundle.tokenizer_file, bundle.max_length).encode(["a fine film", "dull"])
np.save(sys.argv[2], engine.all_exit_logits(encoded))
"""


def test_spin_off_gives_each_session_its_own_sleeping_pool_and_the_same_answers(tiny_bundle, tmp_path):
    # A fresh process: onnxruntime fixes how threads wait with the process's first session.
    import numpy as np

    from romebert.core.bundle import load_bundle
    from romebert.core.tokenization import TextEncoder

    done = subprocess.run([sys.executable, "-c", SPIN_OFF_ENGINE, str(tiny_bundle), str(tmp_path / "logits.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, refused = done.stdout.splitlines()[:2]
    assert first == "0 True 2"  # no spinning, a pool of its own, the threads asked for
    assert refused.startswith("refused:") and "once, before the first session" in refused
    bundle = load_bundle(tiny_bundle)
    shared = default_engine(bundle, Settings(device="cpu", backend="onnxruntime", threads=1))  # this process: the shared pool
    encoded = TextEncoder(bundle.tokenizer_file, bundle.max_length).encode(["a fine film", "dull"])
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), shared.all_exit_logits(encoded), atol=1e-5)


def test_serve_help_gives_every_options_default(capsys):
    with pytest.raises(SystemExit) as stop:
        main("serve", ["--help"])
    help_ = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert stop.value.code == 0
    assert "rows the engine runs together at most (default: 32)" in help_
    assert "(default: None)" not in help_  # an option without a default says nothing


def test_an_on_off_flag_that_is_neither_says_what_it_expected(capsys):
    with pytest.raises(SystemExit) as stop:
        main("serve", ["--spin", "maybe"])
    assert stop.value.code == 2 and "argument --spin: invalid boolean value: 'maybe'" in capsys.readouterr().err


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


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_serve_stops_with_exit_code_2_before_the_model_loads_when_it_cannot_listen(tiny_bundle, host, capsys, monkeypatch):
    served = []
    monkeypatch.setattr(service_cli, "serve", lambda *args: served.append(args) or 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main("serve", [str(tiny_bundle), "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on {host}:{port}: " in err and not served
    if host == "127.0.0.1":
        assert "Address already in use" in err


def test_serve_listens_on_every_address_its_host_resolves_to_once_each(tiny_bundle, monkeypatch):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this host")
    port = free_port()
    both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)), (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both + both)  # a dual-stack "localhost", listed twice
    served = []
    monkeypatch.setattr(service_cli, "serve", lambda settings, listeners: served.append(listeners) or 0)
    assert main("serve", [str(tiny_bundle), "--host", "localhost", "--port", str(port)]) == 0
    (listeners,) = served
    try:
        assert [sock.getsockname()[:2] for sock in listeners] == [("127.0.0.1", port), ("::1", port)]
        assert listeners[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1  # as asyncio (uvicorn) binds it
    finally:
        for sock in listeners:
            sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(bundle: Path, *flags: str):
    """(process, base URL) of `romebert serve` in a process of its own, once it is ready; killed after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "romebert.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags]
    server = subprocess.Popen(command, cwd=REPO, env=os.environ | {"ROMEBERT_BUNDLE": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
        yield server, base
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_real_server_answers_over_http_and_drains_on_sigterm(tiny_bundle):
    # A 3 s batching window keeps a lone request queued long enough to be in flight at SIGTERM.
    with serve_process(tiny_bundle, "--threads", "1", "--max-wait-ms", "3000", "--max-queue-wait-ms", "10000") as (server, base):
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


def nice_of(pid: int, thread: int) -> int:
    return int((Path(f"/proc/{pid}/task/{thread}/stat").read_text().rsplit(")", 1)[1]).split()[16])


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only; elsewhere the server leaves it")
def test_the_engines_threads_run_below_the_event_loop(tiny_bundle):
    with serve_process(tiny_bundle, "--backend", "onnxruntime", "--threads", "2", "--engine-nice", "7") as (server, base):
        assert httpx.post(f"{base}/classify", json={"text": ["great", "awful"]}).status_code == 200
        loop = nice_of(server.pid, server.pid)  # uvicorn's event loop runs on the main thread
        nices = sorted(nice_of(server.pid, int(t)) for t in os.listdir(f"/proc/{server.pid}/task"))
    # The worker and onnxruntime's one pool thread (the worker's own call is the other of the two threads) run 7 below
    # the loop; at the loop's level only the loop and the idle helpers numpy and onnxruntime start on import.
    below = min(loop + 7, 19)
    assert set(nices) <= {loop, below} and nices.count(below) == 2, (loop, nices)


def test_where_lowering_priority_is_forbidden_loading_goes_on_and_says_so(monkeypatch, caplog):
    from romebert.service import runtime

    def forbidden(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runtime.os, "setpriority", forbidden)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    with caplog.at_level(logging.WARNING, logger="romebert.runtime"):
        runtime.run_below_the_loop(10)
    assert "level with it" in caplog.text and "not permitted" in caplog.text


# -- an in-process uvicorn, for what needs a real socket and a stubbed engine -----------------------


@contextlib.contextmanager
def uvicorn_serving(bundle, gated: bool = False, **overrides):
    """(server, base URL, the Gated engine or None), the real uvicorn in a thread."""
    engines = []

    def factory(b, s):
        engines.append(Gated(default_engine(b, s)))
        return engines[0]

    settings = Settings(bundle=str(bundle), host="127.0.0.1", port=free_port(), device="cpu", threads=1, log_level="warning", **overrides)
    server = build_server(settings, **({"engine_factory": factory} if gated else {}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 30
    while server.runtime.phase.value != "ready" or not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server never became ready"
        time.sleep(0.02)
    try:
        yield server, base, engines[0] if gated else None
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def sample(base: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise KeyError(name + labels)


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_is_closed(tiny_bundle):
    with uvicorn_serving(tiny_bundle, header_timeout_s=0.5) as (_, base, _engine):
        port = int(base.rsplit(":", 1)[1])
        stalled, idle = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        with stalled, idle:
            stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            started = time.monotonic()
            for sock in (stalled, idle):
                answer = read_until_closed(sock)  # returns only once the server closed the connection
                assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
            assert 0.4 < time.monotonic() - started < 5
        assert httpx.post(f"{base}/classify", json={"text": "still serving"}).status_code == 200


def test_on_a_kept_alive_connection_the_next_requests_headers_get_their_time_from_its_first_byte(tiny_bundle):
    with uvicorn_serving(tiny_bundle, header_timeout_s=0.5) as (_, base, _engine):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(http_request(json.dumps({"text": "first"}).encode()))
            [(status, _, _)] = read_responses(sock)
            assert status == 200
            time.sleep(0.7)  # idle past the header timeout: idle is for keep_alive_s to judge, not the header deadline
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
            started = time.monotonic()
            answer = read_until_closed(sock)
            assert 0.4 < time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408 ") and b"the request headers did not arrive within 0.5 s" in answer


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed(tiny_bundle):
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 16\r\n\r\n"
    with uvicorn_serving(tiny_bundle, body_timeout_s=1.0) as (_, base, _engine):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:  # slow, but in time
            sock.sendall(head + b'{"text": ')
            time.sleep(0.3)
            sock.sendall(b'"fine"}')
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b'{"text": ')
            started = time.monotonic()
            answer = read_until_closed(sock)
            assert 0.9 < time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
        assert sample(base, "romebert_requests_total", '{outcome="slow_client"}') == 1
        assert sample(base, "romebert_inflight_requests") == 0


def test_answers_carry_a_date_but_do_not_name_the_server_software(tiny_bundle):
    with uvicorn_serving(tiny_bundle) as (_, base, _engine):
        for answer in (httpx.get(f"{base}/healthz"), httpx.post(f"{base}/classify", json={"text": "fine"})):
            assert answer.status_code == 200
            assert "date" in answer.headers and "server" not in answer.headers


def test_a_client_that_leaves_mid_body_is_counted_as_cancelled_not_as_a_server_error(tiny_bundle, caplog):
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    with caplog.at_level(logging.ERROR), uvicorn_serving(tiny_bundle) as (_, base, _engine):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b'{"text": ')
            time.sleep(0.2)  # the app is reading the body when the client goes
        deadline = time.monotonic() + 10
        while sample(base, "romebert_requests_total", '{outcome="cancelled"}') < 1:
            assert time.monotonic() < deadline, "the request was never counted as cancelled"
            time.sleep(0.02)
        assert sample(base, "romebert_requests_total", '{outcome="error"}') == 0
        assert sample(base, "romebert_inflight_requests") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_that_leaves_gets_no_more_work_done_for_it(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        engine.gate.clear()
        engine.entered = 0
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"text": "nobody will read this", "entropy_threshold": 0.0}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 10
            while engine.entered < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # the client is gone while its layer 1 runs
        deadline = time.monotonic() + 10
        while server.runtime.metrics.registry.get_sample_value("romebert_requests_total", {"outcome": "cancelled"}) < 1:
            assert time.monotonic() < deadline, "the disconnect was never noticed"
            time.sleep(0.01)
        engine.gate.set()
        deadline = time.monotonic() + 10
        while sample(base, "romebert_shed_rows_total", '{reason="cancelled"}') < 1:
            assert time.monotonic() < deadline, "the row was never dropped"
            time.sleep(0.01)
        assert engine.entered == 1  # layers 2 and 3 never ran for it


def http_request(body: bytes, *extra: bytes) -> bytes:
    head = [b"POST /classify HTTP/1.1", b"Host: x", b"Content-Type: application/json", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def read_responses(sock: socket.socket, n: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """The next n HTTP/1.1 responses (each with a Content-Length) off a kept-alive socket."""
    sock.settimeout(10)
    data, responses = b"", []
    while len(responses) < n:
        if b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            status_line, *lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
            size = int(headers["content-length"])
            if len(rest) >= size:
                responses.append((int(status_line.split()[1]), headers, rest[:size]))
                data = rest[size:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {len(responses)} responses and {data!r}"
        data += chunk
    return responses


@contextlib.contextmanager
def past_capacity(server, engine):
    """One row held in flight and the rate set as if each row took 10 s: the predicted wait is 5 s."""
    engine.gate.clear()
    engine.entered = 0
    held = threading.Thread(target=httpx.post, args=(f"http://127.0.0.1:{server.config.port}/classify",),
                            kwargs={"json": {"text": "slow", "entropy_threshold": 0.0}, "timeout": 30})
    held.start()
    deadline = time.monotonic() + 10
    while engine.entered < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    admission = server.runtime.admission
    measured, admission.rate.seconds_per_row = admission.rate.seconds_per_row, 10.0
    try:
        yield
    finally:
        admission.rate.seconds_per_row = measured
        engine.gate.set()
        held.join(timeout=30)


def test_past_capacity_a_request_is_refused_at_the_door_unread_and_its_connection_serves_the_next(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            with past_capacity(server, engine):
                sock.sendall(http_request(b"not even json"))  # never parsed: refused on its headers
                [(status, headers, body)] = read_responses(sock)
                assert status == 503 and headers["retry-after"] == "5" and "connection" not in headers
                error = json.loads(body)["error"]
                assert error["code"] == "overloaded" and "predicted queue wait of 5000 ms" in error["message"]
            sock.sendall(http_request(json.dumps({"text": "the same connection, now served"}).encode()))
            [(status, _, body)] = read_responses(sock)
            assert status == 200 and json.loads(body)["results"][0]["exit_layer"] >= 1
        assert sample(base, "romebert_rejected_requests_total", '{reason="predicted_wait"}') == 1
        assert sample(base, "romebert_requests_total", '{outcome="overloaded"}') == 1
        assert sample(base, "romebert_requests_total", '{outcome="ok"}') == 2
        assert sample(base, "romebert_request_duration_seconds_count") == 3  # the refusal timed too, from its headers
        assert 0 < sample(base, "romebert_request_duration_seconds_sum") < 10


def test_past_capacity_only_post_classify_meets_the_door(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        with past_capacity(server, engine):
            assert httpx.get(f"{base}/classify").status_code == 405
            assert httpx.post(f"{base}/readyz").status_code == 405
            assert httpx.get(f"{base}/healthz").status_code == 200
        assert sample(base, "romebert_rejected_requests_total", '{reason="predicted_wait"}') == 0


def test_a_refusal_waits_for_the_whole_body_so_that_no_client_stops_sending_it_halfway(tiny_bundle):
    """aiohttp, answered while still sending a body, stops sending and reuses the connection: the
    server would read its next request as the rest of the body."""
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"text": "sent in two parts"}).encode()
        with past_capacity(server, engine), socket.create_connection(("127.0.0.1", port)) as sock:
            request = http_request(body)
            sock.sendall(request[:-5])
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # nothing yet: the body is not all in
            sock.sendall(request[-5:])
            [(first, _, _)] = read_responses(sock)
            sock.sendall(request)  # the same connection, the next request read as a request
            [(second, _, _)] = read_responses(sock)
        assert first == second == 503


def test_a_refused_request_whose_body_stalls_gets_408_and_its_connection_closed(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True, body_timeout_s=0.5) as (server, base, engine):
        port = int(base.rsplit(":", 1)[1])
        with past_capacity(server, engine), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(http_request(b'{"text": "never finished"}')[:-5])
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"the request body did not arrive within 0.5 s" in answer
        assert sample(base, "romebert_requests_total", '{outcome="slow_client"}') == 1
        assert 0.4 < sample(base, "romebert_request_duration_seconds_sum") < 5  # from its headers to the 408


def test_a_refused_request_that_expects_100_continue_has_its_connection_closed(tiny_bundle):
    """Its client waits for a 100 before sending the body, so the body may never come: closing
    is the only way not to read what follows as a request."""
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        port = int(base.rsplit(":", 1)[1])
        with past_capacity(server, engine), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(http_request(b"", b"Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 20"))
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"connection: close" in answer


def test_a_request_pipelined_behind_an_unfinished_answer_is_answered_after_it(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        port = int(base.rsplit(":", 1)[1])
        engine.gate.clear()
        engine.entered = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(http_request(json.dumps({"text": "first", "entropy_threshold": 0.0}).encode()))
            deadline = time.monotonic() + 10
            while engine.entered < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refusal = Rejected("overloaded", "from now on, every request is refused")
            server.runtime.admission.door = lambda: refusal  # both the protocol's door and admit() ask it
            sock.sendall(http_request(json.dumps({"text": "second"}).encode()))
            time.sleep(0.2)
            engine.gate.set()
            first, second = read_responses(sock, 2)
        assert first[0] == 200 and json.loads(first[2])["results"][0]["exit_layer"] == server.runtime.bundle.num_layers
        assert second[0] == 503 and json.loads(second[2])["error"]["code"] == "overloaded"


class Boom(BaseException):
    pass


def test_a_dead_worker_answers_its_requests_503_within_a_second_and_stops_the_server_non_zero(tiny_bundle):
    with uvicorn_serving(tiny_bundle, gated=True) as (server, base, engine):
        engine.gate.clear()
        engine.entered = 0
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{base}/classify", json={"text": "x", "entropy_threshold": 0.0}, timeout=10)))
        request.start()
        deadline = time.monotonic() + 10
        while engine.entered < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def broken(*args):
            raise Boom("a bug outside the engine")

        server.runtime.admission.take_urgent = broken  # the worker calls it at the next layer boundary
        died = time.monotonic()
        engine.gate.set()
        request.join(timeout=10)
        assert answer["r"].status_code == 503 and answer["r"].json()["error"]["code"] == "worker_failed"
        assert time.monotonic() - died < 1.0
        assert server.runtime.phase.value == "failed"
        deadline = time.monotonic() + 30
        while not server.should_exit:
            assert time.monotonic() < deadline, "the server was never told to stop"
            time.sleep(0.01)
    assert server.exit_status == 1


def _resealed(tiny_bundle, tmp_path, damage) -> Path:
    """A copy of the bundle, damaged by `damage(folder)`, whose manifest vouches for the damage."""
    from romebert.core.bundle import seal

    folder = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    damage(folder)
    seal(folder, json.loads((folder / "manifest.json").read_text()))
    return folder


@pytest.mark.parametrize("damage,names", [
    (lambda f: (f / "segments" / "layer_02.onnx").write_bytes((f / "segments" / "layer_02.onnx").read_bytes()[:500]), "layer_02.onnx"),
    (lambda f: (f / "tokenizer.json").write_text("{not a tokenizer"), "tokenizer.json"),
], ids=["truncated-segment", "garbage-tokenizer"])
def test_a_bundle_whose_files_cannot_load_exits_2_naming_the_file(tiny_bundle, tmp_path, damage, names):
    bundle = _resealed(tiny_bundle, tmp_path, damage)
    command = [sys.executable, "-m", "romebert.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(free_port()),
               "--threads", "1", "--log-level", "warning"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert names in done.stderr and "cannot serve" in done.stderr


@pytest.mark.asyncio
async def test_the_loop_lag_is_how_late_its_timer_fires_tick_after_tick():
    lag = LoopLag(interval_s=0.01)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    assert lag.seconds < 0.05
    for _ in range(3):  # a loop with more work than core: every tick fires late
        time.sleep(0.15)
        for _ in range(3):  # the overdue tick fires at the loop's next turn
            await asyncio.sleep(0)
    assert lag.seconds > 0.1
    await asyncio.sleep(0.05)  # caught up
    assert lag.seconds < 0.05
    time.sleep(0.3)  # one stall among punctual ticks is not a loop that is behind
    for _ in range(3):
        await asyncio.sleep(0)
    assert lag.seconds < 0.05
    task.cancel()


@pytest.mark.asyncio
async def test_a_loop_that_keeps_up_reads_as_punctual():
    lag = LoopLag(interval_s=0.05)  # a lateness measured from the wrong origin would read as 0.1 s
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.25)
    task.cancel()
    assert lag.seconds < 0.04


def test_one_tick_out_of_line_does_not_move_the_loop_lag():
    lag = LoopLag()
    for late_s in (0.0, 0.0, 0.3):  # a stall
        lag.observe(late_s)
    assert lag.seconds == 0.0
    for late_s in (0.2, 0.2, 0.0):  # behind, and one moment caught up
        lag.observe(late_s)
    assert lag.seconds == 0.2


def test_while_the_event_loop_runs_late_the_door_refuses_and_says_so(tiny_bundle):
    with uvicorn_serving(tiny_bundle, max_loop_lag_ms=50) as (server, base, _engine):
        for _ in range(3):  # as measured by a loop 400 ms behind
            server.runtime.loop_lag.observe(0.4)
        refused = server.runtime.door()
        assert refused.code == "overloaded" and "400 ms behind" in str(refused) and refused.retry_after == "1"
        assert sample(base, "romebert_rejected_requests_total", '{reason="loop_lag"}') == 1
        server.runtime.loop_lag.observe(0.0)  # caught up
        assert server.runtime.door() is None
