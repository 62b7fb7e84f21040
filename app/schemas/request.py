"""The base of every request body: unknown fields are refused, and refused cheaply.

Each validation error costs time on the event loop and bytes in the 422, so a body must not be able to
produce one per key: an object with far more keys than the model knows gets a single error."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Unknown keys still reported one by one (each named in the 422) before the object is refused whole.
MAX_UNKNOWN_FIELDS = 16


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _not_too_many_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + MAX_UNKNOWN_FIELDS:
            raise ValueError(f"{len(data)} fields, of which at most {len(cls.model_fields)} are known")
        return data
