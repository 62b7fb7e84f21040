"""Request and response models of adapter management."""

from __future__ import annotations

from typing import Annotated

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
    state: str = Field(
        ...,
        description="known (on disk, weights not read), loading, ready (validated weights in host memory) or "
        "failed; `unloaded` in the answer to a DELETE.",
    )
    tier: str = Field(..., description="The fastest tier holding it: disk, host or device.")
    resident: bool = Field(..., description="Whether the adapter is in a device slot now (tier device).")
    pinned: bool = Field(..., description="Pinned adapters are never evicted from host memory or the device.")
    version: int = Field(..., description="Grows by one with every PUT of this name.")
    loads: int = Field(..., description="Loads of this name from disk into host memory (first use, reloads, PUTs).")
    host_evictions: int = Field(..., description="Times its weights were dropped from host memory (LRU).")
    requests: int = Field(..., description="Pairs answered by the adapter's current weights (a replace starts again).")
    path: str
    error: str | None = Field(
        None, description="Why the last load of this name failed (state failed, or a refused replace while the old one serves)."
    )
    metrics: dict[str, float] | None = Field(None, description="Held-out metrics recorded by training.")


class AdapterListResponse(BaseModel):
    adapters: list[AdapterInfo]


class AdapterLoadRequest(RequestBody):
    path: str = Field(..., min_length=1, max_length=4096, description="Adapter directory, under a configured adapter root.")
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None,
        min_length=2,
        max_length=1024,
        description="Class names in the head's order, for a plain PEFT adapter whose directory names none "
        "(no metadata.json, no id2label in a config.json).",
    )
