"""The files of a run under --out: report.json, requests.csv (one row per request) and report.png.

Each is written to a temporary file and renamed into place, so a dashboard or CI step reading the
folder never sees half a report.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from romebert.loadtest.plot import plot_report
from romebert.loadtest.records import RequestRecord
from romebert.core.files import atomic_write

CSV_FIELDS = ("start_s", "latency_ms", "lag_ms", "status", "profile", "items", "exit_layers",
              "budget_exhausted", "truncated", "server_latency_ms", "budget_ms", "error", "error_message")


def write_artifacts(out: Path, report: dict[str, Any], records: Sequence[RequestRecord]) -> list[Path]:
    writers: dict[Path, Callable[[Path], None]] = {
        out / "report.json": lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"),
        out / "requests.csv": lambda tmp: _write_csv(tmp, records),
        out / "report.png": lambda tmp: plot_report(tmp, [r.latency_ms for r in records if r.ok], report),
    }
    for path, write in writers.items():
        atomic_write(path, write)
    return list(writers)


def _write_csv(path: Path, records: Sequence[RequestRecord]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([
                f"{r.start_s:.6f}", f"{r.latency_ms:.3f}", f"{r.lag_ms:.3f}", r.status, r.profile, r.items,
                " ".join(map(str, r.exit_layers)), r.budget_exhausted, r.truncated,
                "" if r.server_latency_ms is None else f"{r.server_latency_ms:.3f}", "" if r.budget_ms is None else f"{r.budget_ms:g}",
                r.error or "", r.error_message or "",
            ])
