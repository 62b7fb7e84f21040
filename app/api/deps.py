"""Typed dependencies: how routes reach the runtime the lifespan built (`app.state.runtime`).

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, two
thread hops per request on the hot path for a dictionary lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.config import Settings
from app.errors import NotReady
from app.runtime import Runtime
from app.services.adapters import AdapterService
from app.services.fraud import FraudService
from app.services.metrics import Metrics
from app.services.nli import NLIService
from app.services.readiness import Readiness


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the server is starting")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    # Created with the app (not the runtime) so requests are counted from the first one.
    return request.app.state.metrics


async def get_readiness(runtime: RuntimeDep) -> Readiness:
    return runtime.readiness


async def get_fraud_service(runtime: RuntimeDep) -> FraudService:
    if runtime.fraud_service is None:
        raise NotReady("fraud scoring is not enabled (LORASWAP_FRAUD_ENABLED=false)")
    return runtime.fraud_service


async def get_nli_service(runtime: RuntimeDep) -> NLIService:
    if runtime.nli_service is None:
        reason = "NLI is not enabled" if not runtime.settings.nli_enabled else "the NLI base model is not loaded"
        raise NotReady(reason)
    return runtime.nli_service


async def get_adapter_service(runtime: RuntimeDep) -> AdapterService:
    if runtime.adapter_service is None:
        reason = "NLI is not enabled" if not runtime.settings.nli_enabled else "the NLI base model is not loaded"
        raise NotReady(reason)
    return runtime.adapter_service


AdapterServiceDep = Annotated[AdapterService, Depends(get_adapter_service)]


async def get_admin_adapter_service(
    request: Request,
    service: AdapterServiceDep,
    authorization: Annotated[str | None, Header(description="`Bearer <token>` when an admin token is configured.")] = None,
) -> AdapterService:
    service.authorize(authorization, request.client.host if request.client else None)
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
FraudServiceDep = Annotated[FraudService, Depends(get_fraud_service)]
NLIServiceDep = Annotated[NLIService, Depends(get_nli_service)]
AdminAdapterServiceDep = Annotated[AdapterService, Depends(get_admin_adapter_service)]
