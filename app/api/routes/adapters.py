"""Adapter listing (open) and management (PUT/DELETE, bearer token or loopback)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdapterServiceDep, AdminAdapterServiceDep
from app.schemas.adapters import AdapterInfo, AdapterListResponse, AdapterLoadRequest
from app.schemas.errors import ErrorResponse
from app.services.adapter_registry import AdapterEntry, AdapterRegistry

router = APIRouter(prefix="/adapters", tags=["adapters"])

MANAGEMENT_ERRORS = {
    401: {"model": ErrorResponse, "description": "A token is configured and none was sent."},
    403: {"model": ErrorResponse, "description": "Wrong token, non-loopback client without a token, or a path outside the adapter roots."},
    404: {"model": ErrorResponse, "description": "No adapter of that name, or no adapter directory at the path."},
    409: {"model": ErrorResponse, "description": "A load of the same name is in progress."},
    413: {"model": ErrorResponse, "description": "The body is larger than LORASWAP_MAX_REQUEST_BYTES."},
    422: {"model": ErrorResponse, "description": "Invalid name, or an adapter that cannot serve on this base."},
}


def adapter_info(entry: AdapterEntry, registry: AdapterRegistry) -> AdapterInfo:
    adapter = entry.adapter
    return AdapterInfo(
        name=entry.name,
        task=adapter.task if adapter else None,
        labels=list(adapter.labels) if adapter else [],
        base=adapter.base_id if adapter else None,
        rank=adapter.rank if adapter else None,
        target_modules=list(adapter.target_modules) if adapter else [],
        size_bytes=adapter.size_bytes if adapter else None,
        state=entry.state.value,
        resident=registry.is_resident(entry),
        pinned=registry.is_pinned(entry.name),
        requests=entry.requests,
        path=str(entry.path),
        error=entry.error,
        metrics=_numeric(adapter.metadata.get("metrics")) if adapter else None,
    )


def _numeric(metrics: object) -> dict[str, float] | None:
    if not isinstance(metrics, dict):
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@router.get("", response_model=AdapterListResponse, summary="List every known adapter and its state")
async def list_adapters(service: AdapterServiceDep) -> AdapterListResponse:
    return AdapterListResponse(adapters=[adapter_info(e, service.registry) for e in service.registry.entries()])


@router.get(
    "/{name}",
    response_model=AdapterInfo,
    responses={404: {"model": ErrorResponse, "description": "No adapter of that name."}},
    summary="One adapter and its state",
)
async def get_adapter(name: str, service: AdapterServiceDep) -> AdapterInfo:
    return adapter_info(service.registry.entry(name), service.registry)


@router.put(
    "/{name}",
    response_model=AdapterInfo,
    responses=MANAGEMENT_ERRORS,
    summary="Load an adapter, or replace the one of that name atomically",
)
async def put_adapter(name: str, body: AdapterLoadRequest, service: AdminAdapterServiceDep) -> AdapterInfo:
    entry = await service.load(name, body.path)
    return adapter_info(entry, service.registry)


@router.delete(
    "/{name}",
    response_model=AdapterInfo,
    responses=MANAGEMENT_ERRORS,
    summary="Unload an adapter (requests already queued for it still finish)",
)
async def delete_adapter(name: str, service: AdminAdapterServiceDep) -> AdapterInfo:
    entry = await service.unload(name)
    return adapter_info(entry, service.registry)
