"""Open Inference Protocol v2 (KServe / Triton REST): health, metadata and inference for every NLI adapter
(one model each) and the fraud scorer (the model `fraud`), plus the model repository extension on the same
adapter registry as /adapters. Tensors are decoded and encoded by app.api.v2_codec; the work goes through
the same services (batcher, admission, metrics) as the native routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from app.api.deps import AdminAdapterServiceDep, ReadinessDep, RuntimeDep
from app.api.disconnect import unless_disconnected
from app.api.v2_codec import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    Tensor,
    decode_request,
    encode_response,
    invalid,
    parse_body,
    validation_failed,
)
from app.errors import AdapterNotFound, InvalidInput, NotReady
from app.runtime import Runtime
from app.schemas.fraud import FraudBatchRequest, FraudRequest
from app.schemas.v2 import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ProtocolError,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModel,
    RepositoryUnloadRequest,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
    TensorMetadata,
)
from app.services.nli import PairInput

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

SERVER_NAME = "loraswap"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
FRAUD_MODEL = "fraud"
# The order of the fraud model's `features` columns: the transaction fields of the native API, in
# Kaggle's creditcard.csv order (Time, V1..V28, Amount).
FRAUD_FEATURES = list(FraudRequest.model_fields)
NLI_INPUTS = ("premise", "hypothesis")
# Triton's repository states.
# An adapter known on disk serves on its first request (it loads then): READY for the protocol too.
REPOSITORY_STATES = {"known": "READY", "ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE"}


def _error(description: str) -> dict[str, Any]:
    return {"model": ProtocolError, "description": description}


NOT_FOUND = {404: _error("No model of that name.")}
NOT_READY = {503: _error("The server or model is not loaded yet, or overloaded; has Retry-After.")}
TOO_LARGE = {413: _error("The body is larger than LORASWAP_MAX_REQUEST_BYTES.")}
INVALID = {422: _error("Invalid request: the message names the field or tensor and why.")}
MANAGEMENT = {
    401: _error("A token is configured and none was sent."),
    403: _error("Wrong token, non-loopback client without a token, or a path outside the adapter roots."),
    404: _error("No adapter of that name, or no adapter directory at the path."),
    409: _error("A load of the same name is in progress."),
    **TOO_LARGE,
    422: _error("Invalid name or body, the fraud model's name, or an adapter that cannot serve on this base."),
    **NOT_READY,
}


def _inlined_schema(model: type) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined, for an OpenAPI request body FastAPI does not parse."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _json_body(model: type, required: bool) -> dict[str, Any]:
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": _inlined_schema(model)}}}}


INFER_OPENAPI = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "Binary tensor data: the length of the JSON header; the inputs' bytes follow it.",
            "schema": {"type": "integer", "minimum": 1},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined_schema(InferenceRequest)},
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


# -- health and metadata ------------------------------------------------------------------------------


# The protocol asks only for the status (200 yes, else no); the bodies are KServe's, whose client reads them.
@router.get("/health/live", summary="Server live", response_model=ServerLiveResponse)
async def get_server_live() -> ServerLiveResponse:
    return ServerLiveResponse(live=True)


@router.get(
    "/health/ready",
    summary="Server ready: every configured model is loaded",
    response_model=ServerReadyResponse,
    responses=NOT_READY,
)
async def get_server_ready(readiness: ReadinessDep) -> ServerReadyResponse:
    missing = [f"{s.name}: {s.reason}" for s in readiness.snapshot() if not s.ready]
    if missing:
        raise NotReady("not ready: " + "; ".join(missing))
    return ServerReadyResponse(ready=True)


@router.get("", response_model=ServerMetadataResponse, summary="Server metadata")
async def get_server_metadata(request: Request) -> ServerMetadataResponse:
    return ServerMetadataResponse(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


def _fraud_service(runtime: Runtime):
    if runtime.fraud_service is None:
        raise AdapterNotFound("no model named 'fraud': fraud scoring is not enabled", details={"model": FRAUD_MODEL})
    return runtime.fraud_service


def _nli_part(runtime: Runtime, name: str):
    """The adapter and NLI services; 404 when NLI is off (no such model), 503 when its base failed to load."""
    if runtime.nli_service is None or runtime.adapter_service is None:
        if runtime.settings.nli_enabled:
            raise NotReady("the NLI base model is not loaded")
        raise AdapterNotFound(f"no model named {name!r}", details={"model": name})
    return runtime.nli_service, runtime.adapter_service


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadataResponse,
    summary="Model metadata: inputs and outputs, and the label order of an NLI adapter",
    responses={**NOT_FOUND, **NOT_READY},
)
async def get_model_metadata(model_name: str, runtime: RuntimeDep) -> ModelMetadataResponse:
    if model_name == FRAUD_MODEL:
        service = _fraud_service(runtime)
        return ModelMetadataResponse(
            name=FRAUD_MODEL,
            platform="loraswap_fraud",
            inputs=[TensorMetadata(name="features", datatype="FP32", shape=[-1, len(FRAUD_FEATURES)])],
            outputs=[
                TensorMetadata(name="fraud_probability", datatype="FP32", shape=[-1]),
                TensorMetadata(name="is_fraud", datatype="BOOL", shape=[-1]),
            ],
            parameters={"features": FRAUD_FEATURES, "state": "ready" if service.ready else "failed"},
        )
    _, adapters = _nli_part(runtime, model_name)
    info = adapters.describe(model_name)
    labels = list(info.labels)
    return ModelMetadataResponse(
        name=info.name,
        platform="loraswap_lora",
        inputs=[TensorMetadata(name=n, datatype="BYTES", shape=[-1]) for n in NLI_INPUTS],
        outputs=[
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(labels) or -1]),
        ],
        parameters={"labels": labels, "state": info.state, "task": info.task, "base": info.base},
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model ready",
    response_model=ModelReadyResponse,
    responses={**NOT_FOUND, **NOT_READY},
)
async def get_model_ready(model_name: str, runtime: RuntimeDep) -> ModelReadyResponse:
    if model_name == FRAUD_MODEL:
        if not _fraud_service(runtime).ready:
            raise NotReady("model 'fraud' is not loaded")
        return ModelReadyResponse(name=FRAUD_MODEL, ready=True)
    _, adapters = _nli_part(runtime, model_name)
    info = adapters.describe(model_name)
    if info.state == "failed":  # known, loading and ready adapters all answer requests
        raise NotReady(f"model {model_name!r} failed to load: {info.error}")
    return ModelReadyResponse(name=model_name, ready=True)


# -- inference ----------------------------------------------------------------------------------------


@router.post(
    "/models/{model_name}/infer",
    summary="Inference, with JSON tensors or binary tensor data",
    response_model=InferenceResponse,
    responses={
        200: {"content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
        **NOT_FOUND,
        **TOO_LARGE,
        **INVALID,
        500: _error("The batch this request ran in failed."),
        **NOT_READY,
    },
    openapi_extra=INFER_OPENAPI,
)
async def infer_model(model_name: str, request: Request, runtime: RuntimeDep) -> Response:
    if model_name == FRAUD_MODEL:
        service = _fraud_service(runtime)
        decoded = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        produced, parameters = await _infer_fraud(service, decoded.inputs)
        request.state.model_version = parameters["model_version"]  # for the access log
    else:
        nli, adapters = _nli_part(runtime, model_name)
        adapters.describe(model_name)  # 404 before the body is read, for an unknown model
        decoded = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        produced, parameters = await _infer_nli(nli, model_name, decoded.inputs, request), None
        request.state.adapter = model_name
    content, media_type, headers = encode_response(model_name, decoded, produced, parameters)
    return Response(content, media_type=media_type, headers=headers)


def _expect(inputs: dict[str, Tensor], model: str, wanted: dict[str, tuple[str, ...]]) -> None:
    unknown = sorted(set(inputs) - set(wanted))
    missing = [n for n in wanted if n not in inputs]
    if unknown or missing:
        raise invalid(
            "inputs",
            "names",
            f"model {model!r} takes {', '.join(wanted)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else ""),
        )
    for name, datatypes in wanted.items():
        if inputs[name].datatype not in datatypes:
            raise invalid(name, "datatype", f"is {inputs[name].datatype}; expected {' or '.join(datatypes)}")


async def _infer_nli(nli, model_name: str, inputs: dict[str, Tensor], request: Request) -> list[Tensor]:
    _expect(inputs, model_name, {n: ("BYTES",) for n in NLI_INPUTS})
    premise, hypothesis = inputs["premise"], inputs["hypothesis"]
    for tensor in (premise, hypothesis):
        if len(tensor.shape) != 1 or tensor.shape[0] == 0:
            raise invalid(tensor.name, "shape", f"shape {list(tensor.shape)}; expected [n] with n >= 1")
    if premise.shape != hypothesis.shape:
        raise invalid("hypothesis", "shape", f"{hypothesis.shape[0]} elements for {premise.shape[0]} premises")
    pairs = [PairInput(p, h, model_name) for p, h in zip(premise.values, hypothesis.values)]
    results = await unless_disconnected(request, nli.classify(pairs, batch_field="inputs"))
    n = len(results)
    labels = [r.label for r in results]
    # scores keeps the adapter's label order (its metadata's `labels`), so each row is a column order.
    rows = [list(r.scores.values()) for r in results]
    k = len(rows[0])
    return [
        Tensor("label", "BYTES", (n,), labels),
        Tensor("probabilities", "FP32", (n, k), [p for row in rows for p in row]),
    ]


async def _infer_fraud(service, inputs: dict[str, Tensor]) -> tuple[list[Tensor], dict[str, Any]]:
    _expect(inputs, FRAUD_MODEL, {"features": ("FP32", "FP64")})
    features = inputs["features"]
    width = len(FRAUD_FEATURES)
    if len(features.shape) != 2 or features.shape[1] != width or features.shape[0] == 0:
        raise invalid("features", "shape", f"shape {list(features.shape)}; expected [n, {width}] with n >= 1")
    values = features.values
    rows = [dict(zip(FRAUD_FEATURES, values[i : i + width])) for i in range(0, len(values), width)]
    try:
        # The native API's validation, so both protocols accept exactly the same transactions.
        FraudBatchRequest.model_validate({"transactions": rows})
    except ValidationError as exc:
        raise validation_failed(exc, rename=_feature_name) from None
    scores = await service.score(rows)
    n = len(scores.verdicts)
    return [
        Tensor("fraud_probability", "FP32", (n,), [v.fraud_probability for v in scores.verdicts]),
        Tensor("is_fraud", "BOOL", (n,), [v.is_fraud for v in scores.verdicts]),
    ], {"threshold": scores.threshold, "model_version": scores.model_version}


def _feature_name(loc) -> str:
    # ("transactions", 3, "V1") -> "features[3, V1]": the row and the column's name.
    if len(loc) == 3 and loc[0] == "transactions":
        return f"features[{loc[1]}, {loc[2]}]"
    return "features"


# -- model repository extension ------------------------------------------------------------------------


def _repository_entry(name: str, state: str, error: str | None) -> RepositoryModel:
    return RepositoryModel(name=name, state=REPOSITORY_STATES.get(state, "UNAVAILABLE"), reason=error)


@router.post(
    "/repository/index",
    response_model=list[RepositoryModel],
    response_model_exclude_none=True,
    summary="Every model the server knows, and its state",
    responses={**TOO_LARGE, **INVALID},
    openapi_extra=_json_body(RepositoryIndexRequest, required=False),
)
async def index_repository(request: Request, runtime: RuntimeDep) -> list[RepositoryModel]:
    query: RepositoryIndexRequest = parse_body(await request.body(), RepositoryIndexRequest)
    models = []
    if runtime.fraud_service is not None:
        ready = runtime.fraud_service.ready
        models.append(_repository_entry(FRAUD_MODEL, "ready" if ready else "failed", None if ready else "not loaded"))
    if runtime.adapter_service is not None:
        models += [_repository_entry(i.name, i.state, i.error) for i in runtime.adapter_service.describe_all()]
    models.sort(key=lambda m: m.name)
    if query.ready:
        models = [m for m in models if m.state == "READY"]
    return models


def _not_the_fraud_model(name: str) -> None:
    if name == FRAUD_MODEL:
        raise InvalidInput(
            "the fraud model is loaded at start-up (LORASWAP_FRAUD_MODEL_DIR), not through the repository",
            details={"fields": [{"field": "model_name", "type": "reserved", "message": "the fraud scorer's name"}]},
        )


@router.post(
    "/repository/models/{model_name}/load",
    response_model=RepositoryModel,
    response_model_exclude_none=True,
    summary="Load an adapter as a model (or replace it): the directory of that name, or parameters.path",
    responses=MANAGEMENT,
    openapi_extra=_json_body(RepositoryLoadRequest, required=False),
)
async def load_model(model_name: str, request: Request, service: AdminAdapterServiceDep) -> RepositoryModel:
    _not_the_fraud_model(model_name)
    body: RepositoryLoadRequest = parse_body(await request.body(), RepositoryLoadRequest)
    parameters = body.parameters
    path = parameters.path if parameters and parameters.path else model_name
    info = await service.load(model_name, path, parameters.labels if parameters else None)
    return _repository_entry(info.name, info.state, info.error)


@router.post(
    "/repository/models/{model_name}/unload",
    response_model=RepositoryModel,
    response_model_exclude_none=True,
    summary="Unload an adapter (requests already queued for it still finish)",
    responses=MANAGEMENT,
    openapi_extra=_json_body(RepositoryUnloadRequest, required=False),
)
async def unload_model(model_name: str, request: Request, service: AdminAdapterServiceDep) -> RepositoryModel:
    _not_the_fraud_model(model_name)
    parse_body(await request.body(), RepositoryUnloadRequest)
    info = await service.unload(model_name)
    return RepositoryModel(name=info.name, state="UNAVAILABLE", reason="unloaded")
