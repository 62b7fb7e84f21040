"""Fraud endpoints: POST /fraud scores one transaction, POST /fraud/batch scores many in one model call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.deps import FraudServiceDep
from app.schemas.errors import ErrorResponse
from app.schemas.fraud import FraudBatchItem, FraudBatchRequest, FraudBatchResponse, FraudRequest, FraudResponse

router = APIRouter(tags=["fraud"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "The body is larger than LORASWAP_MAX_REQUEST_BYTES."},
    422: {"model": ErrorResponse, "description": "Invalid transaction(s); `details.fields` names each offending field."},
    503: {"model": ErrorResponse, "description": "No fraud model is loaded; the message says why. Has Retry-After."},
}


@router.post("/fraud", response_model=FraudResponse, summary="Score one card transaction", responses=ERROR_RESPONSES)
async def score_transaction(body: FraudRequest, service: FraudServiceDep, request: Request) -> FraudResponse:
    scores = await service.score([body.model_dump()])
    request.state.model_version = scores.model_version  # for the access log
    verdict = scores.verdicts[0]
    return FraudResponse(
        fraud_probability=verdict.fraud_probability,
        is_fraud=verdict.is_fraud,
        threshold=scores.threshold,
        model_version=scores.model_version,
    )


@router.post(
    "/fraud/batch",
    response_model=FraudBatchResponse,
    summary="Score up to LORASWAP_FRAUD_MAX_BATCH_TRANSACTIONS transactions, results in input order",
    responses=ERROR_RESPONSES,
)
async def score_transactions(body: FraudBatchRequest, service: FraudServiceDep, request: Request) -> FraudBatchResponse:
    # One model_dump of the whole request: pydantic-core converts every item in one pass.
    scores = await service.score(body.model_dump()["transactions"])
    request.state.model_version = scores.model_version
    return FraudBatchResponse(
        results=[FraudBatchItem(fraud_probability=v.fraud_probability, is_fraud=v.is_fraud) for v in scores.verdicts],
        threshold=scores.threshold,
        model_version=scores.model_version,
    )
