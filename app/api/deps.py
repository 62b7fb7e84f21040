"""Annotated dependencies: how routes reach the components the lifespan put on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.config import Settings
from app.errors import NotReady
from app.services.adapters import AdapterService
from app.services.fraud import FraudService
from app.services.nli import NLIService
from app.services.readiness import Readiness


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_readiness(request: Request) -> Readiness:
    return request.app.state.readiness


def _component(request: Request, name: str):
    component = getattr(request.app.state, name, None)
    if component is None:
        raise NotReady(f"{name} is not enabled or not started")
    return component


def get_fraud_service(request: Request):
    return _component(request, "fraud_service")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
FraudServiceDep = Annotated[FraudService, Depends(get_fraud_service)]


def get_nli_service(request: Request):
    return _component(request, "nli_service")


def get_adapter_service(request: Request):
    return _component(request, "adapter_service")


def _authorized_adapter_service(
    request: Request,
    authorization: Annotated[str | None, Header(description="`Bearer <token>` when an admin token is configured.")] = None,
):
    service = get_adapter_service(request)
    service.authorize(authorization, request.client.host if request.client else None)
    return service


NLIServiceDep = Annotated[NLIService, Depends(get_nli_service)]
AdapterServiceDep = Annotated[AdapterService, Depends(get_adapter_service)]
AdminAdapterServiceDep = Annotated[AdapterService, Depends(_authorized_adapter_service)]
