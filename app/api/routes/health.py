"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ReadinessDep
from app.schemas.health import ComponentReadiness, LivenessResponse, ReadinessResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=LivenessResponse, summary="Liveness: the process answers")
async def get_healthz() -> LivenessResponse:
    return LivenessResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    summary="Readiness: 200 only when every configured model is loaded",
    responses={503: {"model": ReadinessResponse, "description": "Something configured is not loaded; `missing` names it."}},
)
async def get_readyz(readiness: ReadinessDep) -> JSONResponse:
    components = [ComponentReadiness(name=s.name, ready=s.ready, reason=s.reason) for s in readiness.snapshot()]
    missing = [c.name for c in components if not c.ready]
    body = ReadinessResponse(ready=not missing, components=components, missing=missing)
    return JSONResponse(body.model_dump(), status_code=503 if missing else 200, headers={"Retry-After": "5"} if missing else None)
