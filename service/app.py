"""The app factory: settings in, a FastAPI app out, with its own metrics registry and lifecycle.

The factory reads only the manifest (cheap, no checksums) so that the request schema, the error
shapes and the metrics know the labels and the number of layers from the first request on;
everything heavy happens in the background loader (see runtime.py). Startup starts that loader;
shutdown waits for it and drains the workers. /docs and /redoc are served with their assets from the package
(fastapi-offline), so they work on a host without internet.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from romebert.core.bundle import load_bundle
from romebert.service.cost_model import CostModel
from romebert.service.errors import install_error_handlers
from romebert.service.metrics import Metrics
from romebert.service.middleware import ClassifyMetrics, DirectRoute, RequestGuard
from romebert.service.routes import CLASSIFY, make_router
from romebert.service.runtime import EngineFactory, Runtime, default_engine
from romebert.service.schemas import classify_request_model
from romebert.service.settings import Settings, SettingsError


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory = default_engine,
    cost_model: CostModel | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> FastAPI:
    """Build the app. `engine_factory`, `cost_model` and `clock` exist so tests can stub them."""
    if not settings.bundle:
        raise SettingsError("no model bundle given (romebert serve BUNDLE, or ROMEBERT_BUNDLE)")
    bundle = load_bundle(settings.bundle, verify=False)
    metrics = Metrics(bundle.num_layers)
    runtime = Runtime(settings, bundle, metrics, engine_factory, cost_model, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start_loading()
        lag = asyncio.create_task(runtime.loop_lag.run())
        yield
        lag.cancel()
        await runtime.drain(settings.graceful_timeout_s)

    app = FastAPIOffline(
        title="romebert",
        summary="Early-exit BERT classification: each item leaves the model at its own exit.",
        version=version("romebert"),
        lifespan=lifespan,
        # The server's own Prometheus metrics are its telemetry; FastAPI's OpenTelemetry hooks
        # would only cost a provider lookup per request (seen in the py-spy profile).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = runtime
    request_model = classify_request_model(runtime.max_entropy, settings.max_items, bundle.pair_input)
    install_error_handlers(app, tuple(request_model.model_fields))
    router = make_router(request_model)
    app.include_router(router)
    # Added innermost first: a request meets the metrics, then the guard, then POST /classify goes
    # straight to its route. (The admission door is in front of the app, in the HTTP protocol:
    # connections.py.)
    app.add_middleware(DirectRoute, route=next(r for r in router.routes if isinstance(r, APIRoute) and r.path == CLASSIFY))
    app.add_middleware(RequestGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(ClassifyMetrics, metrics=metrics)
    return app
