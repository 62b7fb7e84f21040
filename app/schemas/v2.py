"""Request and response models of the Open Inference Protocol v2 (KServe/Triton REST) routes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from app.schemas.request import RequestBody

# The protocol's $parameter: a string, number or boolean (never null, a list or an object).
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[Annotated[str, Field(max_length=256)], Parameter]

# Tensor names of the protocol are short identifiers; these bounds keep a hostile request small.
TENSOR_NAME = Field(min_length=1, max_length=64)
MAX_TENSORS = 16
MAX_DIMS = 8


class ProtocolBody(RequestBody):
    """A v2 request body: unknown fields refused, and no coercion (the string "1" is not the number 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RequestInput(ProtocolBody):
    name: str = TENSOR_NAME
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_DIMS, description="Dimensions of the tensor.")
    datatype: str = Field(min_length=1, max_length=16, description="BYTES, FP32, FP64, BOOL, ...")
    parameters: Parameters | None = Field(
        None, max_length=16, description="`binary_data_size`: the tensor's bytes follow the JSON header."
    )
    data: list[Any] | None = Field(None, description="Elements in row-major order, flat or nested.")


class RequestOutput(ProtocolBody):
    name: str = TENSOR_NAME
    parameters: Parameters | None = Field(
        None, max_length=16, description="`binary_data`: return this output as binary tensor data."
    )


class InferenceRequest(ProtocolBody):
    id: str | None = Field(None, max_length=256, description="Echoed in the response.")
    # KServe's InferenceRESTClient sends these in the body; the URL names the model.
    model_name: str | None = Field(None, max_length=256, description="Ignored: the URL names the model.")
    model_version: str | None = Field(None, max_length=256, description="Ignored: models are not versioned.")
    parameters: Parameters | None = Field(
        None, max_length=32, description="`binary_data_output`: every output as binary tensor data."
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(
        None, max_length=MAX_TENSORS, description="Outputs to return; all of the model's when absent."
    )


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for a binary output.")
    data: list[Any] | None = Field(None, description="Absent when the output is sent as binary data.")


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension (the batch).")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="loraswap's additions: `labels` (the column order of `probabilities`) or `features` "
        "(the column order of `features`), and the state of the model.",
    )


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RepositoryIndexRequest(ProtocolBody):
    ready: bool | None = Field(None, description="true: list only the models ready to serve.")


class RepositoryModel(BaseModel):
    name: str
    state: str = Field(description="READY, LOADING or UNAVAILABLE (Triton's states).")
    reason: str | None = Field(None, description="Why the model is not ready.")


class LoadParameters(ProtocolBody):
    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Adapter directory under a configured adapter root; default: the directory named like the model.",
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, min_length=2, max_length=64, description="Label names in the head's order, for a plain PEFT adapter."
    )


class RepositoryLoadRequest(ProtocolBody):
    parameters: LoadParameters | None = None


class UnloadParameters(ProtocolBody):
    unload_dependents: bool | None = Field(None, description="Accepted for tritonclient; models have no dependents here.")


class RepositoryUnloadRequest(ProtocolBody):
    parameters: UnloadParameters | None = None


class ProtocolError(BaseModel):
    """The protocol's error body, on every non-2xx answer under /v2."""

    error: str
