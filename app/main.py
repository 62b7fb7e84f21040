"""The ASGI app: `create_app(settings)` wires routes, errors and middleware; the lifespan loads the models."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.api.routes import adapters, health, metrics, nli, pages
from app.api.routes import fraud
from app.config import Settings
from app.services.metrics import Metrics
from app.services.readiness import Readiness

logger = logging.getLogger(__name__)


def _start_fraud(app: FastAPI, settings: Settings, readiness: Readiness) -> None:
    # Imported here: sklearn and joblib load only when the fraud scorer is enabled.
    from app.inference.fraud_scorer import FraudModelError, FraudScorer
    from app.services.fraud import FraudService

    try:
        scorer = FraudScorer.load(settings.fraud_model_dir)
    except FraudModelError as exc:
        logger.error("fraud model not served: %s", exc)
        readiness.set_failed("fraud", str(exc))
        app.state.fraud_service = FraudService(None, unavailable_reason=str(exc), metrics=app.state.metrics)
        return
    app.state.fraud_service = FraudService(
        scorer, max_batch_transactions=settings.fraud_max_batch_transactions, metrics=app.state.metrics
    )
    readiness.set_ready("fraud")
    logger.info("fraud model %s loaded from %s", scorer.model_version, settings.fraud_model_dir)


def _start_nli(app: FastAPI, settings: Settings, readiness: Readiness):
    """Build the engine, discover adapters, start the batcher. Returns the batcher (to stop it)."""
    # Imported here: torch and transformers load only when NLI is enabled.
    import torch

    from app.inference.base_model import BaseModelError, resolve_base
    from app.inference.batcher import Batcher
    from app.inference.engine import NLIEngine
    from app.services.adapter_registry import AdapterRegistry
    from app.services.adapters import AdapterService
    from app.services.nli import NLIService

    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))
    spec = resolve_base(settings.base_model, random_init=settings.base_random_init, seed=settings.base_random_seed)
    try:
        engine = NLIEngine(
            spec,
            device=settings.device,
            max_seq_len=settings.max_seq_len_tokens,
            max_resident=settings.max_resident_adapters,
            pinned=set(settings.pinned_adapters),
        )
    except (BaseModelError, OSError, RuntimeError) as exc:
        logger.error("NLI base %s not served: %s", settings.base_model, exc)
        readiness.set_failed("nli", f"base model {settings.base_model!r} failed to load: {exc}")
        return None
    registry = AdapterRegistry(engine, engine.residency, pinned=set(settings.pinned_adapters))
    registry.discover(settings.adapters_dir)
    if settings.default_adapter in registry.ready_names():
        # One forward before taking traffic: the first pays one-off costs (allocations, kernels).
        warm = registry.entry(settings.default_adapter).adapter
        engine.run(engine.encode(["warm-up"], ["warm-up"]), [warm])
    batcher = Batcher(
        engine,
        max_batch_pairs=settings.max_batch_pairs,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_batch_wait_ms,
        max_queue_pairs=settings.max_queue_pairs,
        max_queue_wait_ms=settings.max_queue_wait_ms,
        min_fill=settings.min_batch_fill_ratio
        if settings.min_batch_fill_ratio is not None
        else (0.5 if engine.device.type == "cuda" else 0.9),
        observer=app.state.metrics,
    )
    batcher.start()
    app.state.metrics.state.queue_depth = lambda: batcher.pending_pairs
    residency = engine.residency
    app.state.metrics.state.residency = lambda: (residency.resident_count(), residency.loads, residency.evictions)
    app.state.nli_engine = engine
    app.state.adapter_registry = registry
    app.state.batcher = batcher
    app.state.nli_service = NLIService(
        registry,
        batcher,
        default_adapter=settings.default_adapter,
        max_text_chars=settings.max_text_chars,
        max_pairs_per_request=settings.max_pairs_per_request,
        metrics=app.state.metrics,
    )
    app.state.adapter_service = AdapterService(
        registry, roots=settings.all_adapter_roots(), admin_token=settings.admin_token, metrics=app.state.metrics
    )
    default = settings.default_adapter

    def nli_not_ready() -> str | None:
        ready = registry.ready_names()
        if default in ready:
            return None
        return f"default adapter {default!r} is not loaded (ready: {', '.join(ready) or 'none'})"

    readiness.set_check("nli", nli_not_ready)
    return batcher


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    expected = (["nli"] if settings.nli_enabled else []) + (["fraud"] if settings.fraud_enabled else [])
    readiness = Readiness(expected)
    app.state.readiness = readiness
    if settings.fraud_enabled:
        _start_fraud(app, settings, readiness)
    batcher = _start_nli(app, settings, readiness) if settings.nli_enabled else None
    try:
        yield
    finally:
        if batcher is not None:
            # Graceful: queued pairs are answered before the worker ends.
            await anyio.to_thread.run_sync(batcher.stop)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # FastAPIOffline serves /docs and /redoc from assets inside the package: no CDN.
    app = FastAPIOffline(
        title="loraswap",
        version="0.1.0",
        summary="One frozen encoder, many LoRA adapters chosen per request, and a fraud scorer.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(fraud.router)
    app.include_router(nli.router)
    app.include_router(adapters.router)
    app.include_router(metrics.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app


app = create_app()
