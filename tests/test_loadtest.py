"""`romebert loadtest` end to end, against a stand-in server (tests/stand_in_server.py, a test double).

The tool runs as a subprocess, as a user runs it: Locust monkey-patches the standard library for
gevent on import, which must not happen inside pytest where the stand-in's uvicorn thread runs.
Every run is bounded by --max-requests (and --duration as a backstop). The report, SLO and
server-delta arithmetic and the requests a workload draws are also tested in process, on hand-made
records, scrapes and texts, and so are the asyncio generator's loop (against the stand-in) and the
report's figure: those modules do not import Locust.
"""

from __future__ import annotations

import csv
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from romebert.loadtest import cli as loadtest_cli, plot
from romebert.loadtest.driver import DEFAULT_USERS, MAX_OPEN_LOOP_POOL, pool_size, run_load
from romebert.loadtest.metrics_scrape import ServerDelta, delta, parse
from romebert.loadtest.profiles import Profile, parse_mix, profiles_from_args
from romebert.loadtest.records import RequestRecord, RunResult, record_of
from romebert.loadtest.report import build_report, format_table
from romebert.loadtest.slo import check_slos
from romebert.loadtest.texts import TextItem, TextsError, load_texts
from romebert.loadtest.workload import Workload
from romebert.service.metrics import Metrics
from stand_in_server import STALL_S, StandIn, serve

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, beautifully shot film", "dull", "the plot goes nowhere at all", "please overload the server", "fine",
         "arrived too late to matter"]


def loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "romebert.cli", "loadtest", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def stand_in():
    double = StandIn()
    with serve(double):
        yield double


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_closed_loop_report_matches_what_the_server_served(stand_in, texts, tmp_path):
    out = tmp_path / "out"
    run = loadtest(stand_in.url, "--texts", str(texts), "--users", "3", "--max-requests", "30", "--duration", "30",
                   "--batch", "2", "--mix", "threshold=0.1:1,budget=20:1,default:1", "--out", str(out),
                   "--slo-p99-ms", "10000", "--slo-error-rate", "0.95")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())

    requests = report["requests"]
    assert report["run"]["stop_reason"] == "max-requests"
    assert requests["completed"] == 30 == len(stand_in.bodies)
    assert requests["by_status"] == {k: v for k, v in {"200": 30 - stand_in.rejected, "503": stand_in.rejected}.items() if v}
    assert requests["errors"].get("overloaded", 0) == stand_in.rejected
    assert requests["error_messages"] == ({"overloaded": "queue full"} if stand_in.rejected else {})
    assert all(isinstance(b.text, list) and len(b.text) == 2 for b in stand_in.bodies)

    served = stand_in.exit_layers
    depth = report["exit_depth"]
    assert depth["source"] == "server /metrics"
    assert depth["items"] == len(served) == 2 * requests["ok"]
    assert depth["average_exit_layer"] == pytest.approx(sum(served) / len(served))
    assert depth["exit_layers"] == {str(layer): Counter(served)[layer] for layer in (1, 2, 3)}
    assert depth["responses"]["average_exit_layer"] == pytest.approx(sum(served) / len(served))
    refused_at_door = sum(1 for b in stand_in.bodies if "overload" in " ".join(b.text))
    answered = [b for b in stand_in.bodies if not any(word in " ".join(b.text) for word in ("overload", "too late"))]
    assert depth["server"]["budget_exhausted"] == 2 * sum(1 for b in answered if b.latency_budget_ms is not None)
    assert depth["server"]["rejected_by_reason"] == ({"predicted_wait": refused_at_door} if refused_at_door else {})
    assert depth["server"]["shed_rows_by_reason"] == ({"expired": stand_in.shed_rows} if stand_in.shed_rows else {})
    assert depth["server"]["mean_batch_size"] == pytest.approx(2.0)  # --batch 2, one call per request in the stand-in
    profiles = report["profiles"]
    assert set(profiles) == {"threshold=0.1", "budget=20", "default"}
    assert profiles["threshold=0.1"]["average_exit_layer"] in (None, 3.0)
    assert profiles["budget=20"]["average_exit_layer"] in (None, 2.0)
    assert profiles["default"]["over_budget"] is None

    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    assert report["throughput"]["items_per_s"] == pytest.approx(2 * report["throughput"]["requests_per_s"])
    assert all(o["met"] for o in report["slo"]["objectives"]) and not report["slo"]["misses"]

    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and Counter(r["status"] for r in rows)["503"] == stand_in.rejected
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exit depth" in run.stdout and "p99" in run.stdout
    assert "2.0 rows per layer call" in run.stdout
    assert not refused_at_door or f"predicted_wait: {refused_at_door} requests" in run.stdout
    assert not stand_in.shed_rows or f"expired: {stand_in.shed_rows} rows" in run.stdout


def test_a_profile_reports_the_share_of_budgeted_requests_answered_after_their_budget():
    def answered(server_ms: float, budget_ms: float | None, profile: str) -> RequestRecord:
        return RequestRecord(0.0, server_ms + 1, 0.0, 200, profile, 1, (1,), 0, 0, server_ms, budget_ms)

    records = [answered(10.0, 20.0, "budget=20"), answered(30.0, 20.0, "budget=20"), answered(25.0, 20.0, "budget=20"),
               answered(20.0, 20.0, "budget=20"), answered(99.0, None, "default"),
               RequestRecord(0.0, 5.0, 0.0, 503, "budget=20", 1, budget_ms=20.0, error="overloaded")]
    profiles = build_report({"url": "x", "users": 1, "batch": 1}, RunResult(records, 1.0, "duration", 0), None, None)["profiles"]
    # exactly on budget is not over it; the refused request has no answer to time
    assert profiles["budget=20"]["over_budget"] == pytest.approx(2 / 4)
    assert profiles["default"]["over_budget"] is None


def test_open_loop_keeps_the_arrival_rate(stand_in, texts, tmp_path):
    out = tmp_path / "out"
    run = loadtest(stand_in.url, "--texts", str(texts), "--rate", "25", "--max-requests", "10", "--threshold", "0.6", "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["requests"]["completed"] == 10
    with (out / "requests.csv").open() as f:
        starts = sorted(float(r["start_s"]) for r in csv.DictReader(f))
    assert starts[-1] - starts[0] >= 9 / 25 * 0.75  # 10 sends, 9 intervals of 1/25 s (closed loop: a few ms)
    assert all(isinstance(b.text, str) and b.entropy_threshold == 0.6 for b in stand_in.bodies)
    assert report["schedule"]["rate_reached"] and report["schedule"]["unsent"] == 0
    assert set(stand_in.exit_layers) <= {1} and report["exit_depth"]["average_exit_layer"] in (None, 1.0)


def test_missed_slo_exits_1_and_says_by_how_much(stand_in, texts, tmp_path):
    run = loadtest(stand_in.url, "--texts", str(texts), "--max-requests", "8", "--slo-p99-ms", "0.001", "--out", str(tmp_path / "out"))
    assert run.returncode == 1, run.stderr
    assert "p99 latency SLO missed" in run.stderr and "over by" in run.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [o["met"] for o in report["slo"]["objectives"]] == [False]


def test_unreachable_server_exits_2(tmp_path):
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        run = loadtest(f"http://127.0.0.1:{sock.getsockname()[1]}", "--max-requests", "1", "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "cannot reach server" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--users", "0"],
    ["--batch", "0"],
    ["--mix", "threshold=high"],
    ["--mix", "default", "--threshold", "0.2"],
    ["--texts", "no/such/file.txt"],
    ["--slo-error-rate", "2"],
    ["--rate", "10", "--honour-retry-after"],
])
def test_bad_arguments_exit_2(args, tmp_path):
    run = loadtest("http://127.0.0.1:9", *args, "--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "error" in run.stderr


@pytest.mark.parametrize("flag, lowest_accepted, highest_refused", [
    ("--users", "1", "0"), ("--rate", "0.001", "0"), ("--duration", "0.001", "0"), ("--max-requests", "1", "0"),
    ("--timeout", "0.001", "0"), ("--slo-p99-ms", "0.001", "0"), ("--slo-error-rate", "0", "-0.001"),
])
def test_each_load_argument_is_checked_at_its_bound(flag, lowest_accepted, highest_refused, capsys):
    parser = loadtest_cli._parser()
    loadtest_cli._check(parser, parser.parse_args(["http://127.0.0.1:9", flag, lowest_accepted]))
    with pytest.raises(SystemExit) as refused:
        loadtest_cli._check(parser, parser.parse_args(["http://127.0.0.1:9", flag, highest_refused]))
    assert refused.value.code == 2 and f"{flag}: invalid value" in capsys.readouterr().err


def test_an_error_rate_slo_is_a_fraction_and_the_url_is_a_scheme_and_a_host_alone(capsys):
    parser = loadtest_cli._parser()
    loadtest_cli._check(parser, parser.parse_args(["https://example.org", "--slo-error-rate", "1"]))
    for argv in (["http://127.0.0.1:9", "--slo-error-rate", "1.001"], ["127.0.0.1:8000"]):
        with pytest.raises(SystemExit):
            loadtest_cli._check(parser, parser.parse_args(argv))
    assert "url must start with http:// or https://" in capsys.readouterr().err
    loadtest_cli._check(parser, parser.parse_args(["http://127.0.0.1:9/"]))  # a trailing slash is no path
    with pytest.raises(SystemExit):
        loadtest_cli._check(parser, parser.parse_args(["http://127.0.0.1:9/classify"]))
    assert "url is the server's base URL, without a path: 'http://127.0.0.1:9', not 'http://127.0.0.1:9/classify'" in capsys.readouterr().err


def test_a_run_whose_requests_the_server_refuses_says_why_in_the_servers_words(stand_in, texts, tmp_path):
    out = tmp_path / "out"
    run = loadtest(stand_in.url, "--texts", str(texts), "--max-requests", "4", "--threshold", "0.9", "--out", str(out))
    assert run.returncode == 0, run.stderr  # no SLO was given to miss
    requests = json.loads((out / "report.json").read_text())["requests"]
    assert (requests["failed"], requests["errors"]) == (4, {"invalid_request": 4})
    message = "invalid request: entropy_threshold: Input should be less than or equal to 0.6931471805599453"
    assert requests["error_messages"] == {"invalid_request": message}
    assert f"invalid_request, first: {message}" in run.stdout
    with (out / "requests.csv").open() as f:
        assert [(r["error"], r["error_message"]) for r in csv.DictReader(f)] == [("invalid_request", message)] * 4


@pytest.mark.parametrize("status, body, error, message", [
    (422, '{"error": {"code": "invalid_request", "message": "text: empty"}}', "invalid_request", "text: empty"),
    (503, '{"error": {"code": "overloaded"}}', "overloaded", None),
    (502, "<html>bad gateway</html>", "HTTP 502", None),
    (0, None, "no response", None),
])
def test_a_failed_request_keeps_the_contracts_error_code_and_message_when_its_body_has_them(status, body, error, message):
    request = one_text_workload().draw(random.Random(0))
    record = record_of(status, body, request, 0.0, 1.0, 0.0)
    assert (record.ok, record.error, record.error_message) == (False, error, message)


def test_a_report_shows_the_first_message_of_each_error_code_clipped_to_a_line():
    def failed(error: str, message: str | None) -> RequestRecord:
        return RequestRecord(0.0, 1.0, 0.0, 503, "default", 1, error=error, error_message=message)

    long = "x" * 400
    records = [failed("overloaded", None), failed("overloaded", "first wait"), failed("overloaded", "second wait"),
               failed("HTTP 502", None), failed("invalid_request", long)]
    report = build_report({"url": "x", "users": 1, "batch": 1}, RunResult(records, 1.0, "duration", 0), None, None)
    assert report["requests"]["error_messages"] == {"invalid_request": long, "overloaded": "first wait"}
    table = format_table(report)
    assert "overloaded, first: first wait" in table and "second wait" not in table and "HTTP 502, first" not in table
    assert f"invalid_request, first: {'x' * 157}..." in table and long not in table


def started_loadtest(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "romebert.cli", "loadtest", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_requests(stand_in, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(stand_in.bodies) < n:
        assert time.monotonic() < deadline, "the load test never got going"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("load", [[], ["--rate", "50"]], ids=["closed-loop", "open-loop"])
def test_an_interrupted_run_stops_sending_and_reports_what_it_measured(stand_in, texts, tmp_path, sig, load):
    out = tmp_path / "out"
    run = started_loadtest(stand_in.url, "--texts", str(texts), "--duration", "60", *load, "--out", str(out))
    wait_for_requests(stand_in, 10)
    run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=30)
    assert run.returncode == 0, stderr  # no SLO was given to miss
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["stop_reason"] == "interrupt" and report["run"]["elapsed_s"] < 30
    assert report["requests"]["completed"] == len(stand_in.bodies) >= 10  # every request sent was answered and counted
    assert report["exit_depth"]["items"] == len(stand_in.exit_layers)  # the server's count over the same requests
    assert "stopped by interrupt" in stdout and "Traceback" not in stderr


def test_a_second_ctrl_c_ends_a_run_at_once_without_a_report(stand_in, tmp_path):
    stalls = tmp_path / "stalls.txt"
    stalls.write_text("a film that will stall the server\n")
    out = tmp_path / "out"
    run = started_loadtest(stand_in.url, "--texts", str(stalls), "--duration", "60", "--users", "2", "--out", str(out))
    wait_for_requests(stand_in, 2)  # both users wait STALL_S for their answers
    run.send_signal(signal.SIGINT)  # asks the run to end: nothing new is sent, the two in flight are waited for
    time.sleep(0.5)
    assert run.poll() is None
    run.send_signal(signal.SIGINT)
    started = time.monotonic()
    stdout, stderr = run.communicate(timeout=30)
    assert time.monotonic() - started < STALL_S / 2  # not after the stalled answers
    assert run.returncode == 130 and stderr.strip().endswith("romebert loadtest: interrupted") and "Traceback" not in stderr
    assert not out.exists() and len(stand_in.bodies) == 2


def test_load_tester_does_not_need_torch(tmp_path):
    code = ("import sys; import romebert.loadtest.cli, romebert.loadtest.driver, romebert.loadtest.artifacts, "
            "romebert.loadtest.locustfile, romebert.core.data; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=60).returncode == 0


def test_an_open_loop_that_cannot_hold_its_rate_says_so(stand_in, texts, tmp_path):
    out = tmp_path / "out"
    # one connection for 2000 requests/s: most sends find it busy
    run = loadtest(stand_in.url, "--texts", str(texts), "--rate", "2000", "--users", "1", "--max-requests", "200", "--out", str(out))
    assert run.returncode == 0, run.stderr
    schedule = json.loads((out / "report.json").read_text())["schedule"]
    assert not schedule["rate_reached"] and schedule["unsent"] > 0
    assert "target rate was NOT reached" in run.stdout


def one_text_workload() -> Workload:
    return Workload([TextItem("fine")], [Profile("default")], batch=1, seed=0)


def test_the_open_loop_sends_request_k_at_k_over_the_rate_and_records_how_late_it_left(stand_in):
    result = run_load(stand_in.url, one_text_workload(), users=8, rate=50.0, duration_s=30.0, max_requests=10, timeout_s=5.0)
    assert (result.stop_reason, result.unsent, result.abandoned) == ("max-requests", 0, 0)
    records = sorted(result.records, key=lambda r: r.start_s)
    assert [r.status for r in records] == [200] * 10
    # its start minus its lag is its slot on the schedule, exactly
    assert [r.start_s - r.lag_ms / 1000 for r in records] == pytest.approx([k / 50 for k in range(10)], abs=1e-9)
    assert all(r.lag_ms >= 0 and 0 < r.latency_ms and r.start_s + r.latency_ms / 1000 <= result.elapsed_s for r in records)
    assert result.elapsed_s < 5


def test_the_open_loop_stops_at_its_duration_without_the_send_due_at_its_end(stand_in):
    result = run_load(stand_in.url, one_text_workload(), users=8, rate=10.0, duration_s=0.5, max_requests=None, timeout_s=5.0)
    assert result.stop_reason == "duration" and len(result.records) == 5  # due at 0, 0.1, ... 0.4 s; not at 0.5
    assert 0.4 <= result.elapsed_s < 5


def test_the_open_loop_never_has_more_requests_in_flight_than_users_and_counts_the_sends_it_skipped(stand_in):
    result = run_load(stand_in.url, one_text_workload(), users=1, rate=2000.0, duration_s=30.0, max_requests=100, timeout_s=5.0)
    records = sorted(result.records, key=lambda r: r.start_s)
    assert all(later.start_s >= r.start_s + r.latency_ms / 1000 for r, later in zip(records, records[1:]))
    assert result.unsent > 0 and len(records) + result.unsent == 100


def test_the_closed_loop_sends_max_requests_in_all_whatever_the_users_and_abandons_none(stand_in):
    result = run_load(stand_in.url, one_text_workload(), users=3, rate=None, duration_s=30.0, max_requests=10, timeout_s=5.0)
    assert (len(result.records), result.stop_reason, result.abandoned, result.unsent) == (10, "max-requests", 0, 0)
    assert all(r.lag_ms >= 0 and r.start_s + r.latency_ms / 1000 <= result.elapsed_s < 5 for r in result.records)


def test_a_closed_loop_user_that_honours_retry_after_waits_it_out_after_each_refusal_and_one_that_does_not_resends_at_once(stand_in):
    refused = Workload([TextItem("overload")], [Profile("default")], batch=1, seed=0)  # 503 with Retry-After: 1
    at_once = run_load(stand_in.url, refused, users=1, rate=None, duration_s=1.5, max_requests=None, timeout_s=5.0)
    polite = run_load(stand_in.url, refused, users=1, rate=None, duration_s=2.5, max_requests=None, timeout_s=5.0, honour_retry_after=True)
    assert len(at_once.records) > 20 and {r.status for r in at_once.records} == {503}
    starts = [r.start_s for r in polite.records]
    assert len(starts) == 3 and all(0.99 < later - r < 1.5 for r, later in zip(starts, starts[1:]))
    assert polite.elapsed_s < 3.0  # the last wait ends at the run's end, not a second past it
    with pytest.raises(ValueError, match="closed loop"):
        run_load(stand_in.url, refused, users=1, rate=10.0, duration_s=1.0, max_requests=None, timeout_s=5.0, honour_retry_after=True)


def test_a_request_that_gets_no_response_is_recorded_with_status_0():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it
    result = run_load(f"http://127.0.0.1:{port}", one_text_workload(), users=2, rate=None, duration_s=30.0, max_requests=4, timeout_s=5.0)
    assert [(r.status, r.error) for r in result.records] == [(0, "no response")] * 4


def test_a_report_counts_rates_and_percentiles_exactly_as_the_records_say():
    records = [
        RequestRecord(1.0, 10.0, 0.0, 200, "default", 2, (1, 3), server_latency_ms=8.0),
        RequestRecord(1.5, 30.0, 2.0, 200, "default", 1, (2,)),
        RequestRecord(2.0, 5.0, 1.0, 503, "default", 1, error="overloaded"),
        RequestRecord(3.0, 20.0, 0.0, 200, "threshold=0", 1, (6,)),
    ]
    config = {"url": "x", "users": 4, "batch": 1, "rate": 2.0}
    counted_nothing = ServerDelta(0, None, {}, 0, 0, {}, {}, {}, None, None)
    report = build_report(config, RunResult(records, 0.5, "duration", 0), counted_nothing, None)
    assert report["requests"] == {"completed": 4, "ok": 3, "failed": 1, "error_rate": 0.25,
                                  "by_status": {"200": 3, "503": 1}, "errors": {"overloaded": 1}, "error_messages": {}}
    assert report["throughput"] == {"requests_per_s": 6.0, "items_per_s": 8.0}  # answered only, over the run's 0.5 s
    assert report["server_latency_ms"]["max"] == 8.0  # over the answers that carried it
    assert report["schedule"]["achieved_rate"] == 1.5  # 4 sends, 3 intervals in 2 s
    assert report["exit_depth"]["source"] == "responses"  # a server that counted no items is not the source
    assert (report["exit_depth"]["average_exit_layer"], report["exit_depth"]["items"]) == (3.0, 4)
    default = report["profiles"]["default"]
    assert (default["requests"], default["failed"], default["p50_ms"]) == (3, 1, 20.0)  # the 503's 5 ms is not a latency
    table = format_table(report)
    assert "by profile" in table and "4 completed, 3 ok, 1 failed (25.00%)" in table
    # each profile's row says how many of its requests failed (a budget's 503s show there)
    assert [line.split()[:3] for line in table.splitlines() if line.split()[:1] in (["default"], ["threshold=0"])] == \
        [["default", "3", "1"], ["threshold=0", "1", "0"]]
    assert "average layer 3.000 over 4 items (responses)" in table and "L1: 25.0%  L2: 25.0%  L3: 25.0%  L6: 25.0%" in table

    alone = build_report(config, RunResult(records[:1], 0.0, "duration", 0), None, None)
    assert alone["throughput"] == {"requests_per_s": 0.0, "items_per_s": 0.0}
    assert alone["schedule"]["achieved_rate"] is None  # one send has no interval
    assert "by profile" not in format_table(alone)


@pytest.mark.parametrize("sends, span_s, lag_ms, unsent, reached, on_time", [
    (5, 2.0, 0.0, 0, True, True),  # 2 requests/s, on time
    (5, 2.0, 501.0, 0, True, True),  # late by one interval (500 ms) + 1 ms at p99: on time
    (5, 2.0, 502.0, 0, True, False),  # later: sent in bursts, yet the rate asked for
    (5, 2.0, 0.0, 1, False, True),  # a send skipped
    (20, 10.0, 0.0, 0, True, True),  # 19 intervals in 10 s: 1.9 requests/s, exactly 95% of the target
    (20, 10.5, 0.0, 0, False, True),
])
def test_an_open_loop_reached_its_rate_only_within_5_percent_with_nothing_skipped_and_was_on_time_only_within_one_interval(
        sends, span_s, lag_ms, unsent, reached, on_time):
    records = [RequestRecord(1.0 + span_s * i / (sends - 1), 10.0, lag_ms, 200, "default", 1, (1,)) for i in range(sends)]
    report = build_report({"url": "x", "users": 8, "batch": 1, "rate": 2.0}, RunResult(records, span_s, "duration", 0, unsent), None, None)
    assert (report["schedule"]["rate_reached"], report["schedule"]["on_time"]) == (reached, on_time)
    table = format_table(report)
    assert ("target rate was NOT reached" in table) is not reached
    assert ("sends ran late" in table) is (reached and not on_time)


def test_the_server_delta_is_what_the_server_counted_during_the_run_and_after_a_restart_its_counts_alone():
    metrics = Metrics(3)

    def snapshot():
        return parse(generate_latest(metrics.registry).decode())

    for layer in (3, 3, 3):  # before the run
        metrics.answered(layer, False)
    metrics.layer_ran(10, np.ones((10, 4)))
    metrics.responded(200, 0.01)
    metrics.rejected.labels("predicted_wait").inc()
    before = snapshot()
    for layer in (1, 1, 2):
        metrics.answered(layer, False)
    metrics.layer_ran(2, np.array([[1, 1, 0, 0], [1, 1, 1, 1]]))  # 6 real tokens, 2 padding
    metrics.layer_ran(3, np.array([[1, 1], [1, 1], [1, 0], [1, 1]]))  # 3 real rows and a shape bucket's copy: 5 real, 3 padding
    metrics.responded(200, 0.01)
    metrics.responded(499, 0.01)
    run = delta(before, snapshot())
    assert (run.items, run.average_exit_layer, run.mean_batch_size, run.restarted) == (3, 4 / 3, 2.5, False)
    assert run.padding_share == 5 / 16
    assert run.exit_layers == {"1": 2, "2": 1, "3": 0}  # every layer listed, the ones nobody left at too
    assert run.requests_by_outcome == {"ok": 1, "cancelled": 1} and run.rejected_by_reason == {}

    idle = delta(before, before)  # nothing answered during the run: no restart, nothing to average
    assert (idle.items, idle.average_exit_layer, idle.mean_batch_size, idle.padding_share, idle.restarted) == (0, None, None, None, False)
    restarted = delta(snapshot(), before)  # the counters went down: a new process, whose counts are all of the run
    assert restarted.restarted and (restarted.items, restarted.average_exit_layer, restarted.mean_batch_size) == (3, 3.0, 10.0)
    assert restarted.padding_share == 0
    assert restarted.rejected_by_reason == {"predicted_wait": 1}


@pytest.mark.parametrize("p99_ms, error_rate, misses", [
    (100.0, 0.25, []),  # exactly at both objectives: met
    (99.0, 0.2, ["p99 latency SLO missed: p99 100.000 ms > 99 ms (over by 1.000 ms)",
                 "error-rate SLO missed: 0.2500 > 0.2 (over by 0.0500; 1 of 4 requests failed)"]),
])
def test_an_slo_is_met_up_to_its_target_and_a_miss_says_by_how_much(p99_ms, error_rate, misses):
    report = {"latency_ms": {"p99": 100.0}, "requests": {"error_rate": 0.25, "failed": 1, "completed": 4}}
    verdict = check_slos(report, p99_ms, error_rate)
    assert verdict["misses"] == misses
    assert [o["met"] for o in verdict["objectives"]] == [not misses] * 2


def test_a_request_carries_each_texts_pair_beside_it_one_item_as_strings_several_as_lists():
    items = [TextItem(f"text {i}", f"pair {i}") for i in range(5)]
    profiles = [Profile("threshold=0.2", {"entropy_threshold": 0.2})]
    one = Workload(items, profiles, batch=1).draw(random.Random(0))
    assert isinstance(one.body["text"], str) and one.body["text_pair"] == one.body["text"].replace("text", "pair")
    assert one.body["entropy_threshold"] == 0.2 and (one.profile, one.items) == ("threshold=0.2", 1)
    several = Workload(items, profiles, batch=3).draw(random.Random(0))
    assert len(several.body["text"]) == 3 and several.items == 3
    assert [pair.replace("pair", "text") for pair in several.body["text_pair"]] == several.body["text"]
    assert "text_pair" not in Workload([TextItem("alone")], profiles, batch=2).draw(random.Random(0)).body


def test_an_open_loop_holds_a_second_of_requests_in_flight_by_default_and_users_given_are_kept():
    assert pool_size(None, None) == DEFAULT_USERS  # closed loop
    assert pool_size(None, 10.0) == 11 and pool_size(None, 0.5) == 1
    assert pool_size(None, 5 * MAX_OPEN_LOOP_POOL) == MAX_OPEN_LOOP_POOL
    assert pool_size(3, None) == 3 and pool_size(3, 500.0) == 3


def test_a_mix_gives_one_weighted_profile_per_entry_and_default_sends_neither_field():
    mix = parse_mix("threshold=0.1:0.5, budget=0.5:2,default:0.25,threshold=0")
    assert [(p.name, p.overrides, p.weight) for p in mix] == [
        ("threshold=0.1", {"entropy_threshold": 0.1}, 0.5), ("budget=0.5", {"latency_budget_ms": 0.5}, 2.0),
        ("default", {}, 0.25), ("threshold=0", {"entropy_threshold": 0.0}, 1.0)]


@pytest.mark.parametrize("spec, says", [
    ("threshold=0.1:0", "weight must be positive"),
    ("threshold=0.1:-1", "weight must be positive"),
    ("default:nan", "weight must be positive"),
    ("default:x", "weight 'x' is not a number"),
    ("threshold=-0.1", "threshold must be >= 0"),
    ("budget=0", "budget must be > 0 ms"),
    ("budget=nan", "budget must be > 0 ms"),
    ("latency=20", "expected threshold=T[:W]"),
    ("threshold=", "expected threshold=T[:W]"),
    ("threshold=0.1,threshold=0.1:2", "listed twice"),
])
def test_a_bad_mix_entry_is_refused_saying_which_and_why(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_mix(spec)


def test_threshold_and_budget_make_one_profile_together_and_mix_replaces_both():
    assert profiles_from_args(None, None, None) == [Profile("default", {})]
    assert profiles_from_args(0.0, 25.0, None) == [
        Profile("threshold=0,budget=25", {"entropy_threshold": 0.0, "latency_budget_ms": 25.0})]
    assert profiles_from_args(None, None, "budget=5") == [Profile("budget=5", {"latency_budget_ms": 5.0})]
    for threshold, budget_ms in ((0.2, None), (None, 20.0)):
        with pytest.raises(ValueError, match="--mix replaces"):
            profiles_from_args(threshold, budget_ms, "default")
    with pytest.raises(ValueError, match="budget must be > 0"):
        profiles_from_args(None, 0.0, None)


def test_texts_files_give_their_texts_and_pairs_and_a_bad_one_says_where(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("text,text_pair\nfirst,one\n  ,skipped\nsecond,two\n")
    assert load_texts(csv_file, None) == [TextItem("first", "one"), TextItem("second", "two")]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "text_pair": 3}\n')  # blank lines skipped; a non-string pair is none
    assert load_texts(jsonl, None) == [TextItem("a"), TextItem("b")]
    for name, content, message in [
        ("no_column.csv", "body\nsome text\n", "no_column.csv:1: no 'text' column (columns: body)"),
        ("list.jsonl", '{"text": "a"}\n\n["b"]\n', "list.jsonl:3: expected an object with a string 'text'"),
        ("number.jsonl", '{"text": 5}\n', "number.jsonl:1: expected an object"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "broken.jsonl:2: not JSON"),
        ("mixed.jsonl", '{"text": "a", "text_pair": "x"}\n{"text": "b"}\n', "either every row has a text_pair or none does"),
        ("empty.txt", "\n  \n", "empty.txt: no texts"),
    ]:
        (tmp_path / name).write_text(content)
        with pytest.raises(TextsError, match=re.escape(message)):
            load_texts(tmp_path / name, None)


def drawn_report(monkeypatch, tmp_path, latencies_ms: list[float], report: dict):
    """plot_report's figure, kept open (its close intercepted) so that its panels can be read."""
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)
    plot.plot_report(tmp_path / "report.png", latencies_ms, report)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = figures
    return figure


def plot_input(exit_layers: dict[str, int], average: float | None, latency: dict | None) -> dict:
    return {"config": {"url": "http://h:1", "batch": 2}, "requests": {"completed": 40}, "latency_ms": latency,
            "exit_depth": {"source": "server /metrics", "average_exit_layer": average, "exit_layers": exit_layers}}


def texts_on(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_plot_marks_the_reports_percentiles_on_the_latency_histogram_and_shares_of_items_by_exit_layer(monkeypatch, tmp_path):
    latencies = [float(v) for v in range(1, 41)]
    figure = drawn_report(monkeypatch, tmp_path, latencies, plot_input(
        {"1": 30, "2": 6, "6": 4}, 1.75, {"p50": 20.5, "p95": 38.0, "p99": 39.6}))
    latency_ax, exit_ax = figure.axes
    assert sum(patch.get_height() for patch in latency_ax.patches) == 40  # every successful request, once
    assert [line.get_xdata()[0] for line in latency_ax.lines] == [20.5, 38.0, 39.6]
    assert [t.get_text() for t in latency_ax.get_legend().get_texts()] == ["p50 20.5 ms", "p95 38.0 ms", "p99 39.6 ms"]
    assert [tick.get_text() for tick in exit_ax.get_xticklabels()] == ["1", "2", "6"]
    assert [patch.get_height() for patch in exit_ax.patches] == pytest.approx([0.75, 0.15, 0.10])
    assert texts_on(exit_ax) == ["average 1.75"] and exit_ax.get_title() == "exit layer (server /metrics)"
    assert figure.get_suptitle() == "http://h:1: 40 requests, batch 2"


@pytest.mark.parametrize("requests, bins", [(3, 5), (40, 8), (1000, 50)])
def test_the_latency_histogram_has_a_bin_per_5_requests_but_at_least_5_and_at_most_50(monkeypatch, tmp_path, requests, bins):
    latencies = [float(v) for v in range(requests)]
    figure = drawn_report(monkeypatch, tmp_path, latencies, plot_input({"1": 1}, 1.0, {"p50": 1.0, "p95": 2.0, "p99": 3.0}))
    assert len(figure.axes[0].patches) == bins


def test_the_plot_says_so_when_no_request_succeeded_and_no_item_was_answered(monkeypatch, tmp_path):
    figure = drawn_report(monkeypatch, tmp_path, [], plot_input({}, None, None))
    latency_ax, exit_ax = figure.axes
    assert texts_on(latency_ax) == ["no successful requests"] and not latency_ax.patches and not latency_ax.lines
    assert texts_on(exit_ax) == ["no answered items"] and not exit_ax.patches
