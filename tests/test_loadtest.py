"""`romebert loadtest` end to end, against a stand-in server (tests/stand_in_server.py, a test double).

The tool runs as a subprocess, as a user runs it: Locust monkey-patches the standard library for
gevent on import, which must not happen inside pytest where the stand-in's uvicorn thread runs.
Every run is bounded by --max-requests (and --duration as a backstop).
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stand_in_server import StandIn, serve

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
    from romebert.loadtest.records import RequestRecord, RunResult
    from romebert.loadtest.report import build_report

    def answered(server_ms: float, budget_ms: float | None, profile: str) -> RequestRecord:
        return RequestRecord(0.0, server_ms + 1, 0.0, 200, profile, 1, (1,), 0, 0, server_ms, budget_ms)

    records = [answered(10.0, 20.0, "budget=20"), answered(30.0, 20.0, "budget=20"), answered(25.0, 20.0, "budget=20"),
               answered(99.0, None, "default"), RequestRecord(0.0, 5.0, 0.0, 503, "budget=20", 1, budget_ms=20.0, error="overloaded")]
    profiles = build_report({"url": "x", "users": 1, "batch": 1}, RunResult(records, 1.0, "duration", 0), None, None)["profiles"]
    assert profiles["budget=20"]["over_budget"] == pytest.approx(2 / 3)  # the refused request has no answer to time
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
])
def test_bad_arguments_exit_2(args, tmp_path):
    run = loadtest("http://127.0.0.1:9", *args, "--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "error" in run.stderr


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
