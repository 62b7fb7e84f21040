"""Response model of GET /info: what this server serves and within which limits (like text-embeddings-inference's)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BaseModelInfo(BaseModel):
    name: str = Field(description="The configured base (`LORASWAP_BASE_MODEL`).")
    loaded: bool = Field(description="Whether the base is loaded (false: NLI failed to start or is disabled).")
    model_type: str | None = Field(None, description="Architecture, e.g. bert or roberta.")
    fingerprint: str | None = Field(None, description="sha256 of the base's encoder; adapters must match it.")
    dtype: str | None = Field(None, description="Dtype the base runs in, e.g. float32 or bfloat16.")
    device: str | None = Field(None, description="Where the base runs, e.g. cpu or cuda:0.")


class AdapterCounts(BaseModel):
    known: int = Field(description="Adapters in the registry, whatever their state.")
    ready: int = Field(description="Adapters that can serve (known on disk, loading or loaded; not failed).")
    by_tier: dict[str, int] = Field(description="Adapters by the fastest tier holding them: disk, host, device.")
    default: str | None = Field(description="The adapter a request that names none uses.")


class Limits(BaseModel):
    max_request_bytes: int
    max_text_chars: int
    max_seq_len_tokens: int
    max_pairs_per_request: int
    max_batch_pairs: int
    max_batch_tokens: int
    max_batch_wait_ms: float
    max_queue_pairs: int
    max_queue_wait_ms: float
    max_resident_adapters: int
    fraud_max_batch_transactions: int


class FraudInfo(BaseModel):
    enabled: bool
    ready: bool


class InfoResponse(BaseModel):
    version: str = Field(description="The server's version.")
    base: BaseModelInfo
    adapters: AdapterCounts
    fraud: FraudInfo
    limits: Limits = Field(description="The request and batching limits in force (their settings' names).")
    protocols: list[str] = Field(description="APIs served: the native REST routes and the Open Inference Protocol v2.")
