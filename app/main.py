"""The ASGI app: `create_app(settings)` wires routes, errors and middleware; the lifespan builds the
runtime (app.runtime.build_runtime) and closes it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount
from fastapi_offline import FastAPIOffline

from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.api.openapi import install_openapi
from app.api.routes import adapters, health, metrics, nli, pages
from app.api.routes import fraud
from app.api.routes import info, v2
from app.config import Settings
from app.runtime import build_runtime
from app.services.metrics import Metrics

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Model loading blocks for seconds: off the event loop, which is not serving yet anyway.
    runtime = await anyio.to_thread.run_sync(partial(build_runtime, settings, metrics=app.state.metrics))
    app.state.runtime = runtime
    try:
        yield
    finally:
        # Graceful: queued pairs are answered before the workers end.
        await anyio.to_thread.run_sync(runtime.close)


def route_templates(app: FastAPI) -> list[str]:
    """Every path template the app serves: the documented operations and the rest (docs, mounts)."""
    documented = list(app.openapi().get("paths", {}))
    others = [
        route.path + "/{path:path}" if isinstance(route, Mount) else route.path
        for route in app.routes
        if getattr(route, "path", None)
    ]
    return documented + others


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # FastAPIOffline serves /docs and /redoc from assets inside the package: no CDN.
    app = FastAPIOffline(
        title="loraswap",
        version="0.1.0",
        summary="One frozen encoder, many LoRA adapters chosen per request, and a fraud scorer.",
        lifespan=lifespan,
        # FastAPI asks the global OpenTelemetry providers on every request whether to trace it; with
        # nobody tracing, that was 9% of the event loop's samples under load (docs/benchmarks.md).
        telemetry={key: settings.opentelemetry for key in ("tracing", "metrics", "logs")},
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings.metrics_max_adapters)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(health.router)
    app.include_router(fraud.router)
    app.include_router(nli.router)
    app.include_router(adapters.router)
    app.include_router(metrics.router)
    app.include_router(pages.router)
    app.include_router(info.router)
    app.include_router(v2.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics, templates=lambda: route_templates(app))
    return app


app = create_app()
