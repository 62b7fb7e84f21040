"""Adapter listing (open) and management (PUT/DELETE, bearer token or loopback)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdapterServiceDep, AdminAdapterServiceDep
from app.schemas.adapters import AdapterInfo, AdapterListResponse, AdapterLoadRequest
from app.schemas.errors import ErrorResponse

router = APIRouter(prefix="/adapters", tags=["adapters"])

_AUTH_ERRORS = {
    401: {"model": ErrorResponse, "description": "A token is configured and none was sent."},
    403: {"model": ErrorResponse, "description": "Wrong token, or a non-loopback client without a configured token."},
}
_NOT_READY = {503: {"model": ErrorResponse, "description": "The NLI base model is not loaded (or NLI is disabled)."}}
LIST_ERROR_RESPONSES = {**_NOT_READY}
GET_ERROR_RESPONSES = {404: {"model": ErrorResponse, "description": "No adapter of that name."}, **_NOT_READY}
PUT_ERROR_RESPONSES = {
    401: _AUTH_ERRORS[401],
    403: {
        "model": ErrorResponse,
        "description": "Wrong token, a non-loopback client without a configured token, or a path outside the adapter roots.",
    },
    404: {"model": ErrorResponse, "description": "No adapter directory at the path."},
    409: {"model": ErrorResponse, "description": "A load of the same name is in progress."},
    413: {"model": ErrorResponse, "description": "The body is larger than LORASWAP_MAX_REQUEST_BYTES."},
    422: {"model": ErrorResponse, "description": "Invalid name or body, or an adapter that cannot serve on this base."},
    **_NOT_READY,
}
DELETE_ERROR_RESPONSES = {
    **_AUTH_ERRORS,
    404: {"model": ErrorResponse, "description": "No adapter of that name."},
    409: {"model": ErrorResponse, "description": "A load of the same name is in progress; retry."},
    **_NOT_READY,
}


@router.get("", response_model=AdapterListResponse, responses=LIST_ERROR_RESPONSES, summary="List every known adapter and its state")
async def list_adapters(service: AdapterServiceDep) -> AdapterListResponse:
    return AdapterListResponse(adapters=service.describe_all())


@router.get("/{name}", response_model=AdapterInfo, responses=GET_ERROR_RESPONSES, summary="One adapter and its state")
async def get_adapter(name: str, service: AdapterServiceDep) -> AdapterInfo:
    return service.describe(name)


@router.put(
    "/{name}",
    response_model=AdapterInfo,
    responses=PUT_ERROR_RESPONSES,
    summary="Load an adapter, or replace the one of that name atomically",
)
async def put_adapter(name: str, body: AdapterLoadRequest, service: AdminAdapterServiceDep) -> AdapterInfo:
    return await service.load(name, body.path, body.labels)


@router.delete(
    "/{name}",
    response_model=AdapterInfo,
    responses=DELETE_ERROR_RESPONSES,
    summary="Unload an adapter (requests already queued for it still finish)",
)
async def delete_adapter(name: str, service: AdminAdapterServiceDep) -> AdapterInfo:
    return await service.unload(name)
