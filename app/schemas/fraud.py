"""Request and response models of the fraud endpoints: one card transaction is its 30 numeric fields."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from app.schemas.request import RequestBody

# Strict: a JSON number only (ints accepted), never a string, bool or null; NaN and +-Infinity rejected,
# including 1e309, which JSON parsing turns into infinity. Magnitudes are bounded too: a finite value
# near the float limit (5e307) overflows to infinity inside the model's scaler, which then fails.
# Real transactions sit far inside the bound (|V| < 200, Amount < 30,000, Time < 200,000 in the data).
MAX_MAGNITUDE = 1e9
Component = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_MAGNITUDE)]


class FraudRequest(RequestBody):
    """One transaction as in Kaggle's creditcard.csv, without its label. All 30 fields are required; the
    model may use fewer (its manifest lists which)."""

    Time: NonNegative = Field(description="Seconds since the first transaction of the capture.")
    V1: Component
    V2: Component
    V3: Component
    V4: Component
    V5: Component
    V6: Component
    V7: Component
    V8: Component
    V9: Component
    V10: Component
    V11: Component
    V12: Component
    V13: Component
    V14: Component
    V15: Component
    V16: Component
    V17: Component
    V18: Component
    V19: Component
    V20: Component
    V21: Component
    V22: Component
    V23: Component
    V24: Component
    V25: Component
    V26: Component
    V27: Component
    V28: Component
    Amount: NonNegative = Field(description="Transaction amount.")


class FraudResponse(BaseModel):
    fraud_probability: float = Field(description="Probability of fraud, calibrated to the real fraud rate.")
    is_fraud: bool = Field(description="fraud_probability >= threshold.")
    threshold: float = Field(description="Decision threshold from the model's manifest, on the same scale.")
    model_version: str


class FraudBatchRequest(RequestBody):
    # The upper bound is the `fraud_max_batch_transactions` setting, checked by the service.
    # fail_fast: validation stops at the first bad transaction (each can carry 30 errors).
    transactions: list[FraudRequest] = Field(
        min_length=1, fail_fast=True, description="1..fraud_max_batch_transactions transactions."
    )


class FraudBatchItem(BaseModel):
    fraud_probability: float
    is_fraud: bool


class FraudBatchResponse(BaseModel):
    results: list[FraudBatchItem] = Field(description="One result per transaction, in input order.")
    threshold: float
    model_version: str
