"""POST /nli and POST /nli/batch: validate, hand to the NLI service, map results back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import NLIServiceDep
from app.api.disconnect import unless_disconnected
from app.schemas.errors import ErrorResponse
from app.schemas.nli import NLIBatchRequest, NLIBatchResponse, NLIRequest, NLIResponse
from app.services.nli import Classification, PairInput

router = APIRouter(tags=["nli"])

ERROR_RESPONSES = {
    404: {"model": ErrorResponse, "description": "Unknown adapter; `details.available` lists the ready ones."},
    413: {"model": ErrorResponse, "description": "The body is larger than LORASWAP_MAX_REQUEST_BYTES."},
    422: {"model": ErrorResponse, "description": "Invalid input: empty or over-long text, bad or oversized batch."},
    500: {"model": ErrorResponse, "description": "The batch this request ran in failed."},
    503: {"model": ErrorResponse, "description": "Queue full or NLI not loaded; retry after `Retry-After` seconds."},
}


def _response(result: Classification) -> NLIResponse:
    return NLIResponse(label=result.label, scores=result.scores, adapter=result.adapter)


@router.post("/nli", response_model=NLIResponse, responses=ERROR_RESPONSES, summary="Classify one premise/hypothesis pair")
async def create_nli(body: NLIRequest, service: NLIServiceDep, request: Request) -> NLIResponse:
    [result] = await unless_disconnected(
        request, service.classify([PairInput(body.premise, body.hypothesis, body.adapter)])
    )
    request.state.adapter = result.adapter  # for the access log
    return _response(result)


@router.post(
    "/nli/batch",
    response_model=NLIBatchResponse,
    responses=ERROR_RESPONSES,
    summary="Classify many pairs, each with its own adapter if it names one",
)
async def create_nli_batch(body: NLIBatchRequest, service: NLIServiceDep, request: Request) -> NLIBatchResponse:
    pairs = [PairInput(p.premise, p.hypothesis, p.adapter or body.adapter) for p in body.pairs]
    results = await unless_disconnected(request, service.classify(pairs, batch_field="pairs"))
    request.state.adapter = ",".join(sorted({r.adapter for r in results}))
    return NLIBatchResponse(results=[_response(r) for r in results])
