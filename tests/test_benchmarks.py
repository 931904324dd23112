"""The in-process benchmark scripts still run end to end, at a tiny size, on the tiny bundle.

They are run by hand, rarely, on real bundles; bench/scheduler_policy.py crashed for several
sessions on the first 503 admission gave it before anyone ran it again. These runs keep the
scripts in step with the serving code they drive; their numbers mean nothing here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_scheduler_policy_benchmark_replays_a_stream_and_counts_what_admission_refused(tiny_bundle, tmp_path):
    out = tmp_path / "scheduler_policy.json"
    # A budget of a microsecond: a budgeted request that finds work in flight is refused, one that
    # finds the worker idle is let in (and answered from exit 1, over its budget).
    subprocess.run([sys.executable, str(ROOT / "bench" / "scheduler_policy.py"), "--bundle", str(tiny_bundle), "--seconds", "1",
                    "--loads", "0.5", "--policies", "complete", "regroup", "--budget-ms", "0.001", "--out", str(out)],
                   check=True, timeout=300)
    report = json.loads(out.read_text())
    assert set(report["capacity_items_per_s"]) == {"complete", "regroup"}
    for name in ("complete", "regroup"):
        run = report["results"]["load_0.5"][name]
        assert run["requests"] == report["results"]["load_0.5"]["requests"] > 0
        assert run["refused"] == run["budget"]["refused"] > 0  # only budgets are refused below capacity
        assert run["budget"]["refused"] < run["budget"]["requests"]
        assert run["budget"]["answered_over_budget"] == 1.0
    assert report["environment"]["commit"]


def test_the_instant_server_is_the_real_server_whose_rows_all_leave_at_the_asked_exit(tiny_bundle):
    sys.path.insert(0, str(ROOT))
    from bench.harness import instant_serve, running

    command = instant_serve(tiny_bundle, "--layers", "2")
    with running(command, Path(tiny_bundle).parent / "instant.log") as (_, url):
        body = json.dumps({"text": ["a fine film", "dull", "an odd, long, winding and in the end rewarding piece of work"],
                           "entropy_threshold": 0.01}).encode()
        answer = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/classify", body, {"content-type": "application/json"})).read())
        assert [r["exit_layer"] for r in answer["results"]] == [2, 2, 2]
        assert all(r["label"] == "negative" and r["entropy"] < 1e-5 for r in answer["results"])
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        assert 'backend="instant/none"' in metrics  # served by the stand-in engine, through the real server's metrics
    bad = subprocess.run(command[:-1] + ["9", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--layers must be 1..3" in bad.stderr


def test_the_serving_layer_benchmark_sends_lone_requests_through_the_real_scheduler(tiny_bundle):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "worker_step.py"), str(tiny_bundle), "50"], capture_output=True,
                         text=True, timeout=120, check=True)
    assert run.stdout.startswith("lone request through the serving layer, p50 us: ") and float(run.stdout.split()[-1]) > 0


def test_the_serving_benchmark_refuses_a_bundle_and_a_peer_trained_on_different_data(tiny_bundle, tmp_path):
    """A peer trained on other data would be scored on texts it was not trained for, and its
    accuracy set beside ours on a different test split: refused before any server starts."""
    peer = tmp_path / "imdb-finetuned"
    peer.mkdir()
    (peer / "training_record.json").write_text(json.dumps({"config": {"data": "imdb", "seed": 1}}))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--bundle", str(tiny_bundle), "--finetuned", str(peer),
                          "--out", str(tmp_path / "serve.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "--bundle was trained on rotten_tomatoes, --finetuned on imdb: compare models of one dataset"
    assert not (tmp_path / "serve.json").exists()


def test_the_padding_benchmark_runs_the_real_scheduler_at_each_slack_and_a_higher_slack_pads_more(tiny_bundle, tmp_path):
    out = tmp_path / "padding.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "padding.py"), "--bundle", str(tiny_bundle), "--seconds", "1", "--rounds", "1",
                    "--slacks", "1,3", "--users", "8", "--out", str(out)], check=True, timeout=300)
    tight, loose = json.loads(out.read_text())["rows"]
    assert (tight["pad_slack"], loose["pad_slack"]) == (1.0, 3.0)
    assert 1.0 <= tight["padded_per_real_token"] < loose["padded_per_real_token"]
    assert tight["rows_per_layer_call"] < loose["rows_per_layer_call"]
    assert tight["items_per_s"] > 0 and loose["items_per_s"] > 0


def test_the_profile_counts_each_event_loop_sample_under_its_innermost_request_stage():
    from bench.profile_server import stages

    loop = "thread (1): MainThread;Runner.run (asyncio/runners.py:118)"
    raw = "\n".join([
        f"{loop};HttpToolsProtocol.data_received (h.py:1);RequestResponseCycle.run_asgi (h.py:2);RequestGuard.__call__ (m.py:3);"
        "RequestGuard.__call__.<locals>.guarded_receive (m.py:4) 3",
        f"{loop};RequestResponseCycle.run_asgi (h.py:2);DirectRoute.__call__ (m.py:9);TextEncoder.tokenize (t.py:1);"
        "TextEncoder.tokenize.<locals>.<listcomp> (t.py:2);tokenizers_encode (tokenizers.so) 5",
        f"{loop};uv__io_poll (uvloop.so) 2",
        f"{loop};_settle (tickets.py:1) 1",
        "thread (2): romebert-engine-0;Scheduler._run (s.py:1);TextEncoder.tokenize (t.py:1) 10",
    ])
    assert stages(raw) == {"tokenizing": round(5 / 11, 4), "the body guard (headers, deadline, byte count)": round(3 / 11, 4),
                           "uvloop's own loop (polling, sockets)": round(2 / 11, 4), "elsewhere": round(1 / 11, 4)}
