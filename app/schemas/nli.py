"""Request and response models of the NLI routes."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.request import RequestBody

# Adapter names are at most 64 characters (app.services.adapter_registry.NAME_PATTERN); a longer one is
# refused here, so a multi-megabyte "name" is never looked up nor echoed back in a 404.
ADAPTER_NAME_MAX_CHARS = 64


class NLIRequest(RequestBody):
    premise: str = Field(..., min_length=1, description="The premise sentence.", examples=["A man is playing a guitar."])
    hypothesis: str = Field(..., min_length=1, description="The hypothesis sentence.", examples=["A person makes music."])
    adapter: str | None = Field(
        None,
        max_length=ADAPTER_NAME_MAX_CHARS,
        description="Adapter (task) to use; the configured default when absent.",
        examples=["mnli"],
    )


class NLIResponse(BaseModel):
    label: str = Field(..., description="The most probable label.")
    scores: dict[str, float] = Field(..., description="Probability of every label of the adapter.")
    adapter: str = Field(..., description="The adapter that produced the answer.")


class NLIPair(RequestBody):
    premise: str = Field(..., min_length=1)
    hypothesis: str = Field(..., min_length=1)
    adapter: str | None = Field(
        None,
        max_length=ADAPTER_NAME_MAX_CHARS,
        description="Adapter for this pair; else the request's, else the default.",
    )


class NLIBatchRequest(RequestBody):
    # fail_fast: validation stops at the first bad pair, so a huge list of bad pairs costs one pair's errors.
    pairs: list[NLIPair] = Field(
        ..., min_length=1, fail_fast=True, description="Pairs to classify; each may name its own adapter."
    )
    adapter: str | None = Field(
        None, max_length=ADAPTER_NAME_MAX_CHARS, description="Adapter for pairs that name none."
    )


class NLIBatchResponse(BaseModel):
    results: list[NLIResponse] = Field(..., description="One result per pair, in input order.")
