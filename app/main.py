"""The ASGI app: `create_app(settings)` wires routes, errors and middleware; the lifespan loads the models."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.api.routes import health
from app.config import Settings
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
        app.state.fraud_service = FraudService(None, unavailable_reason=str(exc))
        return
    app.state.fraud_service = FraudService(scorer)
    readiness.set_ready("fraud")
    logger.info("fraud model %s loaded from %s", scorer.model_version, settings.fraud_model_dir)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    expected = (["nli"] if settings.nli_enabled else []) + (["fraud"] if settings.fraud_enabled else [])
    readiness = Readiness(expected)
    app.state.readiness = readiness
    if settings.fraud_enabled:
        _start_fraud(app, settings, readiness)
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="loraswap",
        version="0.1.0",
        summary="One frozen encoder, many LoRA adapters chosen per request, and a fraud scorer.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


app = create_app()
