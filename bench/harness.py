"""What the benchmarks share: a server in a fresh process, readiness, and a record of where they ran.

Every benchmark result carries `environment()`: the commit, the package versions and the CPU
(model and the instruction-set flags that decide which kernels run), since timings mean nothing
without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numpy as np

from romebert.core.bundle import Bundle, BundleError, load_bundle
from romebert.core.tokenization import Encoded, TextEncoder
from romebert.loadtest.profiles import Profile
from romebert.loadtest.texts import TextItem
from romebert.loadtest.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 64  # the engine benchmarks pad every row to this many tokens
PACKAGES = ("onnxruntime", "onnxruntime-ep-openvino", "openvino", "torch", "transformers", "tokenizers", "numpy", "fastapi", "uvicorn",
            "starlette", "pydantic", "prometheus-client", "aiohttp", "locust")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def checkout_commit(checkout: Path = ROOT) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()


def environment() -> dict:
    commit = checkout_commit()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    cpu = {"model": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)), "flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()

        def field(name: str) -> str | None:
            return next((l.split(":", 1)[1].strip() for l in lines if l.split(":", 1)[0].strip() == name), None)

        cpu["model"] = field("model name") or cpu["model"]
        # a hypervisor may name several CPUs alike ("AMD EPYC"); family and model number tell them apart
        cpu["family_model"] = f"{field('cpu family')}/{field('model')}"
        flags = set((field("flags") or "").split())
        cpu["flags"] = [f for f in CPU_FLAGS if f in flags]
    return {"commit": commit + ("+uncommitted" if dirty else ""), "python": platform.python_version(), "versions": versions, "cpu": cpu}


# What a finished run's record may differ in from the config asked for and still be that run: where
# it was written, how it was resumed and how often it saved, and how its dev split was batched.
_NOT_THE_RUN = {"output", "resume", "force", "save_every", "crash_after_steps", "eval_batch_size", "precision"}


def same_run(checkpoint: Path, cfg) -> bool:
    """Whether the finished checkpoint was trained with `cfg` (a TrainConfig), precision as resolved:
    a benchmark whose settings changed since must not report the runs it kept from before."""
    import torch

    from romebert.training.checkpoint import read_record
    from romebert.training.train import resolve_precision, trained_precision

    record = read_record(checkpoint)
    if not record:
        return False
    asked = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_THE_RUN}
    # a field added since the run trained is missing from its record; its default is the
    # behaviour from before it existed, so the run counts as trained with the default
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    had = {k: v for k, v in (defaults | record["config"]).items() if k not in _NOT_THE_RUN}
    return asked == had and trained_precision(record) == resolve_precision(cfg.precision, torch.device(cfg.device))


def kept(logits_file: Path, cfg) -> bool:
    """Whether a benchmark's kept logits are those of the run `cfg` asks for; logits of a run trained
    with other settings are removed (the run trains again), so they are never reported as today's."""
    if logits_file.is_file() and not same_run(Path(cfg.output), cfg):
        print(f"=== {logits_file.parent}: kept from other settings than today's, trained again", flush=True)
        logits_file.unlink()
    return logits_file.is_file()


def trained(cfg) -> Path:
    """`cfg`'s checkpoint: the finished one at cfg.output when it is that run (so a benchmark killed
    after training, while it computed logits, does not train again), else trained now, resuming a
    run that was cut off."""
    from romebert.training.train import train

    # a finished run of other settings at the same path is trained again and replaced
    return Path(cfg.output) if same_run(Path(cfg.output), cfg) else train(dataclasses.replace(cfg, force=True))


def exported(checkpoint: Path, path: Path, **options) -> Path:
    """The bundle at `path`, exported again from `checkpoint` (with export_bundle's `options`)
    unless it loads and holds these very weights: benchmarks reuse their bundles across runs,
    and a checkpoint retrained since at the same path would leave them measuring an older model."""
    from romebert.model_export.export import export_bundle
    from romebert.training.checkpoint import weights_digest

    try:
        if load_bundle(path).manifest["source"].get("weights_sha256") == weights_digest(checkpoint):
            return path
    except BundleError:
        pass
    return export_bundle(checkpoint, path, force=path.exists(), **options)


def one_text_each(texts: list[str]) -> Workload:
    """The serving benchmarks' load: one text per request, at the bundle's default threshold."""
    return Workload([TextItem(t) for t in texts], [Profile("default")], batch=1, seed=0)


def served_backend(bundle: Bundle) -> dict:
    """The backend and precision `romebert serve --backend auto` runs this bundle on (the export's choice)."""
    return bundle.manifest.get("backend") or {"backend": "onnxruntime", "precision": bundle.precision}


def running_backend(url: str) -> str:
    """What a running server says it runs on (/readyz: e.g. "openvino/bf16"): the bundle's choice,
    unless ROMEBERT_BACKEND or a flag overrode it."""
    with urllib.request.urlopen(url + "/readyz", timeout=10) as answer:
        return json.load(answer)["backend"]


def in_turns(names: list[str], k: int) -> list[str]:
    """Round k's order for what a benchmark compares in turns: as given in even rounds, reversed in
    odd ones, so that the machine's drift within a round favours none of them."""
    return names if k % 2 == 0 else names[::-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def romebert_serve(bundle: Path, *flags: str) -> list[str]:
    """Our server's command line (its defaults: no access log line per request)."""
    return [sys.executable, "-m", "romebert.cli", "serve", str(bundle), "--host", "127.0.0.1", "--log-level", "warning", *flags]


def instant_serve(bundle: Path, *flags: str) -> list[str]:
    """Our server with an engine that costs nothing (bench/instant_server.py): its command line."""
    return [sys.executable, str(Path(__file__).resolve().parent / "instant_server.py"), str(bundle), *flags]


@contextmanager
def older_checkout(checkout: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(the module that is `romebert`'s CLI, the environment that imports the code) of an older
    checkout, so that its server runs its own code: since the one `romebert` namespace, an
    editable install maps that name to this checkout, so a folder named romebert that links to the
    older one goes first on the path; before it (ed35dab and older) the checkout itself."""
    if (checkout / "romebert_cli.py").exists():
        yield "romebert_cli", {"PYTHONPATH": str(checkout)}
        return
    with tempfile.TemporaryDirectory() as shadow:
        os.symlink(checkout.resolve(), Path(shadow) / "romebert")
        yield "romebert.cli", {"PYTHONPATH": shadow}


@contextmanager
def running(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """(process, base URL) of a server started with `--port` appended, ready; stopped afterwards.

    `cwd`: where it runs (`python -m` puts it first on sys.path: an older checkout's server must
    run in that checkout, or it imports this one's packages)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command + ["--port", str(port)], env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
                                stdout=subprocess.DEVNULL, stderr=log_file, cwd=cwd)
        try:
            wait_ready(url, proc)
            yield proc, url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def padded(encoder: TextEncoder, texts: list[str], width: int = SEQ_LEN) -> Encoded:
    """The texts as one batch, every row padded to `width` tokens (a fixed shape per batch size)."""
    e = encoder.encode(texts)
    widen = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
    return Encoded(widen(e.input_ids), widen(e.attention_mask), widen(e.token_type_ids), e.truncated, e.lengths)


def measure_side_by_side(candidates: dict, batches: list[Encoded], labels: np.ndarray) -> dict[str, dict]:
    """Each batch goes through every candidate in turn (round-robin), so drift in machine load
    hits all of them alike; each candidate is warmed up once first. run(batch) -> (preds, layers)."""
    for run in candidates.values():
        run(batches[0])
    times = {name: [] for name in candidates}
    preds = {name: [] for name in candidates}
    layers = {name: [] for name in candidates}
    for b in batches:
        for name, run in candidates.items():
            t = time.perf_counter()
            p, layer = run(b)
            times[name].append(time.perf_counter() - t)
            preds[name].append(p)
            layers[name].append(layer)
    out = {}
    for name in candidates:
        p, layer = np.concatenate(preds[name]), np.concatenate(layers[name])
        out[name] = {
            "p50_ms": round(1000 * float(np.median(times[name])), 3),
            "items_per_s": round(len(p) / sum(times[name]), 1),
            "test_acc": round(float((p == labels[: len(p)]).mean()), 4),
            "avg_exit_layer": round(float(layer.mean()), 3),
        }
    return out
