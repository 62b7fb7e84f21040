"""Response models of the liveness and readiness probes."""

from __future__ import annotations

from pydantic import BaseModel


class ComponentReadiness(BaseModel):
    name: str
    ready: bool
    reason: str | None = None


class ReadinessResponse(BaseModel):
    ready: bool
    components: list[ComponentReadiness]
    missing: list[str]


class LivenessResponse(BaseModel):
    status: str
