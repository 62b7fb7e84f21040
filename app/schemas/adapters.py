"""Request and response models of adapter management."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.request import RequestBody


class AdapterInfo(BaseModel):
    name: str
    task: str | None
    labels: list[str]
    base: str | None
    rank: int | None
    target_modules: list[str]
    size_bytes: int | None = Field(None, description="Size of adapter_model.safetensors, in bytes.")
    state: str = Field(..., description="loading, ready or failed.")
    resident: bool = Field(..., description="Whether the adapter's weights are on the device now.")
    pinned: bool = Field(..., description="Pinned adapters are never evicted from the device.")
    requests: int = Field(..., description="Pairs served with this adapter since it was loaded.")
    path: str
    error: str | None = Field(None, description="Why the adapter failed to load, when state is failed.")
    metrics: dict[str, float] | None = Field(None, description="Held-out metrics recorded by training.")


class AdapterListResponse(BaseModel):
    adapters: list[AdapterInfo]


class AdapterLoadRequest(RequestBody):
    path: str = Field(..., min_length=1, max_length=4096, description="Adapter directory, under a configured adapter root.")
