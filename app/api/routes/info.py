"""GET /info: the base model, its dtype and device, the adapters, the limits and the version, in one answer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import RuntimeDep
from app.schemas.errors import ErrorResponse
from app.schemas.info import AdapterCounts, BaseModelInfo, FraudInfo, InfoResponse, Limits

router = APIRouter(tags=["operations"])

PROTOCOLS = ["loraswap-rest", "open-inference-protocol-v2"]


@router.get(
    "/info",
    response_model=InfoResponse,
    summary="What this server serves: base, dtype, device, adapters, limits, version",
    responses={503: {"model": ErrorResponse, "description": "The server is still starting."}},
)
async def get_info(request: Request, runtime: RuntimeDep) -> InfoResponse:
    settings, engine = runtime.settings, runtime.engine
    base = BaseModelInfo(name=settings.base_model, loaded=engine is not None)
    if engine is not None:
        # str() of the engine's torch objects: "cpu", "cuda:0", "torch.float32" (routes hold no tensors).
        base.model_type = engine.config.model_type
        base.fingerprint = engine.fingerprint
        base.dtype = str(engine.dtype).removeprefix("torch.")
        base.device = str(engine.device)
    adapters = runtime.adapter_service.describe_all() if runtime.adapter_service is not None else []
    fraud = runtime.fraud_service
    limits = Limits(**{name: getattr(settings, name) for name in Limits.model_fields})
    return InfoResponse(
        version=request.app.version,
        base=base,
        adapters=AdapterCounts(
            known=len(adapters),
            ready=sum(a.state != "failed" for a in adapters),
            by_tier={tier: sum(a.tier == tier for a in adapters) for tier in ("disk", "host", "device")},
            default=settings.default_adapter,
        ),
        fraud=FraudInfo(enabled=settings.fraud_enabled, ready=fraud is not None and fraud.ready),
        limits=limits,
        protocols=PROTOCOLS,
    )
