"""Request and response models of the NLI routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NLIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    premise: str = Field(..., min_length=1, description="The premise sentence.", examples=["A man is playing a guitar."])
    hypothesis: str = Field(..., min_length=1, description="The hypothesis sentence.", examples=["A person makes music."])
    adapter: str | None = Field(None, description="Adapter (task) to use; the configured default when absent.", examples=["mnli"])


class NLIResponse(BaseModel):
    label: str = Field(..., description="The most probable label.")
    scores: dict[str, float] = Field(..., description="Probability of every label of the adapter.")
    adapter: str = Field(..., description="The adapter that produced the answer.")


class NLIPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    premise: str = Field(..., min_length=1)
    hypothesis: str = Field(..., min_length=1)
    adapter: str | None = Field(None, description="Adapter for this pair; else the request's, else the default.")


class NLIBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[NLIPair] = Field(..., min_length=1, description="Pairs to classify; each may name its own adapter.")
    adapter: str | None = Field(None, description="Adapter for pairs that name none.")


class NLIBatchResponse(BaseModel):
    results: list[NLIResponse] = Field(..., description="One result per pair, in input order.")
