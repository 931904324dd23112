"""What the server serves and where it stands: starting -> ready -> draining, or failed.

Loading (checksums, sessions on the device asked for, warm-up) runs in a background thread while
HTTP is already up, so /healthz answers at once and /readyz says 503 until the model can really
answer; an orchestrator then sends traffic only to replicas that are warm. Draining is the
reverse: readiness and new requests get 503 while the workers finish what they can before the
drain deadline.

Supervision: a bundle that cannot load (the error names the file) or a worker that dies turns the
phase to failed, readiness and new requests to 503, and asks the process to exit non-zero
(`request_exit`, wired to uvicorn by `romebert serve`), so that the orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import math
import os
import sys
import threading
import time
from typing import Callable

from romebert.core.bundle import Bundle, load_bundle
from romebert.core.engine import Engine, default_threads, openvino_available, set_pool_spinning
from romebert.core.tokenization import TextEncoder
from romebert.service.admission import Admission
from romebert.service.cohorts import BatchLimit, EngineLike
from romebert.service.cost_model import CostModel, EwmaCostModel, warm_up
from romebert.service.loop_lag import LoopLag
from romebert.service.metrics import Metrics
from romebert.service.policy import POLICIES
from romebert.service.scheduler import Scheduler
from romebert.service.settings import Settings
from romebert.service.tickets import Rejected

log = logging.getLogger("romebert.runtime")

EngineFactory = Callable[[Bundle, Settings], EngineLike]

EXIT_CANNOT_LOAD = 2  # the bundle or the device is unusable: restarting will not help by itself
EXIT_WORKER_DIED = 1


def backend_for(bundle: Bundle, settings: Settings) -> tuple[str, str]:
    """(backend, OpenVINO precision): as asked, or with `auto` what the bundle's export measured
    best; OpenVINO only on the CPU and where it is installed (else a warning)."""
    if settings.backend != "auto":
        return settings.backend, settings.openvino_precision
    choice = bundle.manifest.get("backend") or {"backend": "onnxruntime"}
    if choice["backend"] == "openvino":
        if settings.device == "cuda":
            return "onnxruntime", settings.openvino_precision
        if not openvino_available():
            log.warning("the bundle is measured fastest on OpenVINO, which offers no CPU device here "
                        "(neither onnxruntime-ep-openvino nor openvino installed, or this CPU unsupported): serving with onnxruntime")
            return "onnxruntime", settings.openvino_precision
        return "openvino", choice["precision"]
    return "onnxruntime", settings.openvino_precision


def default_engine(bundle: Bundle, settings: Settings) -> EngineLike:
    """One engine for all workers (sessions may run concurrently: on OpenVINO, one stream per
    worker); see Settings.threads."""
    threads = settings.threads or max(default_threads() // settings.workers, 1)
    backend, precision = backend_for(bundle, settings)
    set_pool_spinning(settings.spin)
    return Engine(bundle, device=settings.device, threads=threads, backend=backend, precision=precision, streams=settings.workers)


def run_below_the_loop(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` levels (at most to 19); the threads it
    starts from then on inherit it.

    Past capacity the event loop must go on reading requests, refusing most of them and handing
    the answers back, on the cores the engine keeps busy (onnxruntime's threads spin between
    calls). Where the engine is fast enough that this is thousands of requests a second (the int8
    files on onnxruntime), the loop at equal priority falls behind and admitted answers wait for
    it far past the admission bound. Off by default: where the loop keeps up it only costs
    throughput, its wake-ups preempting the engine's threads (docs/results.md, "The engine's
    threads below the event loop"). Linux only: elsewhere nice is per process, and lowering it
    would lower the loop too."""
    if nice == 0 or sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + nice, 19))
    except OSError as err:  # a sandbox that forbids it: serve anyway, level with the loop
        log.warning("cannot run the engine's threads below the event loop (%s): they run level with it", err)


class Phase(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (Python's default: 700 or 2000)


def settle_garbage_collector() -> None:
    """What is loaded at start lives as long as the process: move it out of the cyclic collector's
    reach (gc.freeze), and collect young objects less often. Under overload the collector had taken
    15% of the server's samples (py-spy), every pass walking FastAPI's, pydantic's and numpy's
    long-lived objects; a request's own garbage is mostly freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class Runtime:
    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        metrics: Metrics,
        engine_factory: EngineFactory = default_engine,
        cost_model: CostModel | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.settings = settings
        self.bundle = bundle  # manifest read, files not yet verified: load() does that
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.cost_model = cost_model
        self.clock = clock
        self.labels = bundle.labels
        self.max_entropy = math.log(len(self.labels))  # no exit's entropy can exceed ln(C)
        self.phase = Phase.STARTING
        self.error: str | None = None
        self.device: str | None = None
        self.backend: str | None = None  # e.g. "openvino/bf16"
        self.encoder: TextEncoder | None = None
        self.scheduler: Scheduler | None = None
        self.admission: Admission | None = None
        self.loop_lag = LoopLag()  # measured by a task of the serving loop (the app's lifespan)
        self.exit_code: int | None = None
        self._loader: threading.Thread | None = None
        self.request_exit: Callable[[int], None] = lambda code: None
        self._lock = threading.Lock()

    def start_loading(self) -> None:
        """load() in a background thread, HTTP being up meanwhile; drain() waits for it. That
        thread runs `engine_nice` levels below the event loop, and so does every thread it starts
        (the engine's pools, the workers): see run_below_the_loop."""
        def load_below_the_loop() -> None:
            run_below_the_loop(self.settings.engine_nice)
            self.load()

        self._loader = threading.Thread(target=load_below_the_loop, name="romebert-load", daemon=True)
        self._loader.start()

    def load(self) -> None:
        """Verify the bundle, open the engine, warm it up and start the workers (blocking)."""
        try:
            started = time.perf_counter()
            bundle = load_bundle(self.bundle.root)
            engine = self.engine_factory(bundle, self.settings)
            encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
            cost_model = self.cost_model or EwmaCostModel(engine.num_layers)
            limit = BatchLimit(self.settings.max_batch, self.settings.max_batch_tokens, engine.padded_shape, self.settings.pad_slack)
            seconds_per_row = warm_up(engine, cost_model, limit, bundle.max_length)
            admission = Admission(
                self.metrics, max_queue=self.settings.max_queue, max_queue_wait_s=self.settings.max_queue_wait_ms / 1000,
                workers=self.settings.workers, seconds_per_row=seconds_per_row, loop_lag_s=lambda: self.loop_lag.seconds,
                max_loop_lag_s=self.settings.max_loop_lag_ms / 1000, clock=self.clock,
            )
            scheduler = Scheduler(
                engine, admission, self.metrics, cost_model, policy=POLICIES[self.settings.policy], limit=limit,
                max_wait_ms=self.settings.max_wait_ms, workers=self.settings.workers, clock=self.clock, on_failure=self._worker_died,
            )
            device = getattr(engine, "device", "cpu")
            backend = f"{getattr(engine, 'backend', 'onnxruntime')}/{getattr(engine, 'precision', bundle.precision)}"
            self.metrics.model_info.info({
                "model": str(bundle.manifest.get("model_name", bundle.root.name)),
                "num_layers": str(bundle.num_layers),
                "precision": bundle.precision,
                "labels": ",".join(bundle.labels),
                "device": device,
                "backend": backend,
                "providers": ",".join(getattr(engine, "providers", [])),
            })
        except Exception as err:  # noqa: BLE001 - logged, reported by /healthz and /readyz, and the process exits
            log.error("cannot serve %s: %s", self.bundle.root, err, exc_info=not isinstance(err, (RuntimeError, ValueError, OSError)))
            self._fail(f"{type(err).__name__}: {err}", EXIT_CANNOT_LOAD)
            return
        settle_garbage_collector()
        with self._lock:
            if self.phase is not Phase.STARTING:  # shutdown began while we were loading
                return
            self.encoder, self.admission, self.device, self.backend = encoder, admission, device, backend
            scheduler.start()
            self.scheduler, self.phase = scheduler, Phase.READY
        log.info("ready on %s (%s, %d layers, default threshold %g, %d worker(s)) in %.1fs", device, backend, bundle.num_layers,
                 bundle.default_threshold, self.settings.workers, time.perf_counter() - started)

    def _worker_died(self, err: BaseException) -> None:
        self._fail(f"a worker died: {type(err).__name__}: {err}", EXIT_WORKER_DIED)

    def _fail(self, error: str, code: int) -> None:
        with self._lock:
            self.error, self.phase = error, Phase.FAILED
            if self.exit_code is None:
                self.exit_code = code
        if self.admission is not None:
            self.admission.fail_all(Rejected("worker_failed", "this server is failing and restarts; retry elsewhere"), "worker_failed")
        self.request_exit(code)

    def check_ready(self) -> Scheduler:
        """The scheduler, or Rejected (503 with Retry-After) saying why there is none to take a request."""
        if self.phase is Phase.READY and self.scheduler is not None:
            return self.scheduler
        if self.phase is Phase.DRAINING:
            raise Rejected("shutting_down", "the server is shutting down")
        if self.phase is Phase.FAILED:
            raise Rejected("model_failed", f"this server cannot serve and is exiting: {self.error}")
        raise Rejected("not_ready", "the model is still loading")

    def door(self) -> Rejected | None:
        """The door (a refusal, or None to go on): admission's; open while loading, when the
        route's check_ready gives the answer instead."""
        admission = self.admission
        return None if admission is None else admission.door()

    def begin_drain(self) -> None:
        """Stop taking work: /readyz and new requests get 503; queued rows that cannot start
        before the drain deadline get 503 now, the rest are served."""
        with self._lock:
            if self.phase in (Phase.STARTING, Phase.READY):
                self.phase = Phase.DRAINING
        if self.admission is not None:
            self.admission.close(drain_s=0.8 * self.settings.graceful_timeout_s)

    async def drain(self, timeout_s: float) -> None:
        """begin_drain(), then wait until the loader and the workers have stopped. A loader still
        at work (a SIGTERM during start-up) is waited for: a process that ends while one of its
        threads is inside onnxruntime aborts (std::terminate, exit code 134) instead of exiting.
        (Once draining, a finished load starts no workers.)"""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        if self._loader is not None:
            await asyncio.to_thread(self._loader.join, timeout_s)
            if self._loader.is_alive():
                log.error("still loading after %.0fs of draining; stopping anyway", timeout_s)
        remaining = max(deadline - time.monotonic(), 0.0)
        if self.scheduler is not None and not await asyncio.to_thread(self.scheduler.join, remaining):
            log.error("workers still busy after %.0fs of draining; stopping anyway", timeout_s)
