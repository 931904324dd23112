"""What the server serves and where it stands: starting -> ready -> draining (or failed).

Loading (checksums, sessions, warm-up) runs in a background thread while HTTP is already up, so
/healthz answers at once and /readyz says 503 until the model can really answer; an orchestrator
then sends traffic only to replicas that are warm. Draining is the reverse: readiness and new
requests get 503 while the scheduler finishes every row it has taken.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from typing import Callable

from romebert.core.bundle import Bundle, load_bundle
from romebert.service.cost_model import CostModel, EwmaCostModel, warm_up
from romebert.core.engine import Engine, default_threads
from romebert.service.errors import ApiError
from romebert.service.metrics import Metrics
from romebert.service.scheduler import EngineLike, Scheduler
from romebert.service.settings import Settings
from romebert.core.tokenization import TextEncoder

log = logging.getLogger("romebert.runtime")

RETRY_AFTER_S = 1

EngineFactory = Callable[[Bundle, Settings], EngineLike]


def default_engine(bundle: Bundle, settings: Settings) -> EngineLike:
    """One engine for all workers (sessions are safe to run concurrently); the cores split among them."""
    threads = settings.threads or max(default_threads() // settings.workers, 1)
    return Engine(bundle, device=settings.device, threads=threads)


class Phase(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


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
        self.encoder: TextEncoder | None = None
        self.scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Verify the bundle, open the engine, warm it up and start the scheduler (blocking)."""
        try:
            started = time.perf_counter()
            bundle = load_bundle(self.bundle.root)
            engine = self.engine_factory(bundle, self.settings)
            cost_model = self.cost_model or EwmaCostModel(engine.num_layers)
            points = warm_up(engine, cost_model, self.settings.max_batch, bundle.max_length)
            scheduler = Scheduler(
                engine, self.metrics, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                max_queue=self.settings.max_queue, policy=self.settings.policy, workers=self.settings.workers, cost_model=cost_model, clock=self.clock,
            )
            self.encoder = TextEncoder(bundle.tokenizer_file, bundle.max_length)
            self.metrics.model_info.info({
                "model": str(bundle.manifest.get("model_name", bundle.root.name)),
                "num_layers": str(bundle.num_layers),
                "precision": bundle.precision,
                "labels": ",".join(bundle.labels),
            })
        except Exception as err:  # noqa: BLE001 - reported by /healthz and /readyz, and logged
            log.exception("loading the model failed")
            self.error, self.phase = f"{type(err).__name__}: {err}", Phase.FAILED
            return
        with self._lock:
            if self.phase is not Phase.STARTING:  # shutdown began while we were loading
                return
            scheduler.start()
            self.scheduler, self.phase = scheduler, Phase.READY
        log.info("ready: %d warm-up shapes in %.1fs", points, time.perf_counter() - started)

    def check_ready(self) -> Scheduler:
        """The scheduler, or a 503 saying why there is none to take this request."""
        if self.phase is Phase.READY and self.scheduler is not None:
            return self.scheduler
        if self.phase is Phase.DRAINING:
            raise ApiError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.phase is Phase.FAILED:
            raise ApiError(503, "model_failed", f"the model could not be loaded: {self.error}")
        raise ApiError(503, "not_ready", "the model is still loading", headers={"Retry-After": str(RETRY_AFTER_S)})

    def begin_drain(self) -> None:
        """Stop taking work: from now on /readyz and new requests get 503. Safe from a signal handler."""
        with self._lock:
            if self.phase in (Phase.STARTING, Phase.READY):
                self.phase = Phase.DRAINING
            if self.scheduler is not None:
                self.scheduler.close()

    async def drain(self, timeout_s: float) -> None:
        """begin_drain(), then wait until every row the scheduler took has been answered."""
        self.begin_drain()
        if self.scheduler is not None and not await asyncio.to_thread(self.scheduler.join, timeout_s):
            log.error("scheduler still busy after %.0fs of draining; stopping anyway", timeout_s)
