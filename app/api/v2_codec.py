"""Open Inference Protocol v2 tensors on the wire: decodes an inference request (JSON tensors and the binary
tensor data extension) into flat Python values, and encodes output tensors back, JSON or binary.

Binary tensor data (Triton's `binary_tensor_data` extension): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then the raw bytes of each input whose `parameters` carry
`binary_data_size`, in input order. Elements are little-endian; a BYTES element is a 4-byte little-endian
length followed by that many bytes; a BOOL element is one byte."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from app.errors import InvalidInput
from app.schemas.v2 import InferenceRequest, InferenceResponse, ResponseOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"

FP32_MAX = 3.4028234663852886e38
# Fixed-size element formats for struct (little-endian); BYTES is length-prefixed and handled apart.
_FIXED = {"FP32": ("f", 4), "FP64": ("d", 8), "BOOL": ("?", 1)}
DECODABLE = ("BYTES", *_FIXED)
# Errors listed in one message; the rest are counted.
MAX_REPORTED = 5


@dataclass(frozen=True)
class Tensor:
    """One tensor with its elements flattened in row-major order: str for BYTES, float for FP32/FP64,
    bool for BOOL."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]


@dataclass(frozen=True)
class OutputChoice:
    name: str
    binary: bool


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[OutputChoice] | None  # None: the client asked for every output
    binary_by_default: bool


def invalid(field: str, kind: str, message: str) -> InvalidInput:
    """A 422 naming one field, in the details shape every 422 of the API uses."""
    return InvalidInput(f"{field}: {message}", details={"fields": [{"field": field, "type": kind, "message": message}]})


def field_name(loc: Sequence[Any]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a JSON body against `model`, whatever its content type (Triton clients send none);
    an empty body is an empty object. The 422 names each bad field and says why, never echoing input."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise validation_failed(exc) from None


def validation_failed(exc: ValidationError, rename=field_name) -> InvalidInput:
    errors = exc.errors(include_input=False, include_url=False)
    fields = [
        {
            "field": "body" if err["type"] == "json_invalid" else rename(err["loc"]),
            "type": err["type"],
            "message": err["msg"],
        }
        for err in errors
    ]
    listed = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:MAX_REPORTED])
    more = f"; and {len(fields) - MAX_REPORTED} more" if len(fields) > MAX_REPORTED else ""
    return InvalidInput(f"invalid request: {listed}{more}", details={"fields": fields[:50]})


def decode_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Split and validate an inference request. Every input is decoded to flat values whose count
    matches its shape; anything malformed is a 422 naming the tensor."""
    binary = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise invalid(HEADER_LENGTH, "header", "must be an integer") from None
        if not 0 < size <= len(body):
            raise invalid(HEADER_LENGTH, "header", f"must be between 1 and the body's {len(body)} bytes")
        body, binary = body[:size], body[size:]
    request: InferenceRequest = parse_body(body, InferenceRequest)

    inputs: dict[str, Tensor] = {}
    offset = 0
    for index, spec in enumerate(request.inputs):
        where = f"inputs[{index}]"
        if spec.name in inputs:
            raise invalid(f"{where}.name", "duplicate", f"input {spec.name!r} is given twice")
        parameters = spec.parameters or {}
        if any(key.startswith("shared_memory") for key in parameters):
            raise invalid(f"{where}.parameters", "unsupported", "shared memory is not supported; send the data")
        if spec.datatype not in DECODABLE:
            raise invalid(f"{where}.datatype", "datatype", f"{spec.datatype!r} is not served here ({', '.join(DECODABLE)})")
        count = math.prod(spec.shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            if spec.data is not None:
                raise invalid(where, "ambiguous", "gives both data and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(f"{where}.parameters.binary_data_size", "int", "must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(
                    f"{where}.parameters.binary_data_size", "too_long", f"{size} bytes, past the end of the body"
                )
            values = _from_binary(binary[offset : offset + size], spec.datatype, count, where)
            offset += size
        elif spec.data is not None:
            values = _from_json(spec.data, spec.datatype, count, where)
        else:
            raise invalid(f"{where}.data", "missing", "no data and no binary_data_size")
        inputs[spec.name] = Tensor(spec.name, spec.datatype, tuple(spec.shape), values)
    if offset != len(binary):
        raise invalid("body", "binary", f"{len(binary) - offset} bytes after the tensors' binary data")

    parameters = request.parameters or {}
    binary_by_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_by_default, bool):
        raise invalid("parameters.binary_data_output", "bool", "must be true or false")
    outputs = None
    if request.outputs is not None:
        outputs = []
        for index, wanted in enumerate(request.outputs):
            options = wanted.parameters or {}
            if "classification" in options:
                raise invalid(f"outputs[{index}].parameters", "unsupported", "the classification extension is not served")
            if any(key.startswith("shared_memory") for key in options):
                raise invalid(f"outputs[{index}].parameters", "unsupported", "shared memory is not supported")
            as_binary = options.get("binary_data", binary_by_default)
            if not isinstance(as_binary, bool):
                raise invalid(f"outputs[{index}].parameters.binary_data", "bool", "must be true or false")
            outputs.append(OutputChoice(wanted.name, as_binary))
    return DecodedRequest(request.id, inputs, outputs, binary_by_default)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of a flat or nested JSON array (without recursion: the nesting is the client's)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(data: list[Any], datatype: str, count: int, where: str) -> list[Any]:
    values = _flatten(data)
    if len(values) != count:
        raise invalid(f"{where}.data", "shape", f"{len(values)} elements for a shape of {count}")
    for i, value in enumerate(values):
        if datatype == "BYTES":
            ok = isinstance(value, str)
        elif datatype == "BOOL":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise invalid(f"{where}.data[{i}]", "type", f"not a {datatype} element")
    if datatype in ("FP32", "FP64"):
        limit = FP32_MAX if datatype == "FP32" else math.inf
        for i, value in enumerate(values):
            if not (math.isfinite(value) and abs(value) <= limit):
                raise invalid(f"{where}.data[{i}]", "finite", f"must be a finite {datatype} number")
        values = [float(v) for v in values]
    return values


def _from_binary(raw: bytes, datatype: str, count: int, where: str) -> list[Any]:
    if datatype == "BYTES":
        values: list[Any] = []
        position = 0
        while position < len(raw):
            if position + 4 > len(raw):
                raise invalid(where, "binary", "a BYTES element's 4-byte length is cut short")
            (length,) = struct.unpack_from("<I", raw, position)
            position += 4
            if position + length > len(raw):
                raise invalid(where, "binary", f"BYTES element {len(values)} runs past the tensor's data")
            try:
                values.append(raw[position : position + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise invalid(f"{where}[{len(values)}]", "utf8", "is not valid UTF-8 text") from None
            position += length
        if len(values) != count:
            raise invalid(where, "shape", f"{len(values)} BYTES elements for a shape of {count}")
        return values
    code, itemsize = _FIXED[datatype]
    if len(raw) != count * itemsize:
        raise invalid(where, "shape", f"{len(raw)} bytes; a {datatype} tensor of {count} elements has {count * itemsize}")
    values = list(struct.unpack(f"<{count}{code}", raw))
    if datatype in ("FP32", "FP64"):
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise invalid(f"{where}[{i}]", "finite", f"must be a finite {datatype} number")
    return values


def _to_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.values:
            encoded = value.encode("utf-8")
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    code, _ = _FIXED[tensor.datatype]
    return struct.pack(f"<{len(tensor.values)}{code}", *tensor.values)


def encode_response(
    model_name: str,
    request: DecodedRequest,
    produced: list[Tensor],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, str, dict[str, str]]:
    """The response body, its media type and headers: the outputs the client asked for (all when it
    named none), each as JSON data or binary as asked. Unknown output names are a 422."""
    by_name = {t.name: t for t in produced}
    if request.outputs is None:
        chosen = [OutputChoice(t.name, request.binary_by_default) for t in produced]
    else:
        chosen = request.outputs
        for index, choice in enumerate(chosen):
            if choice.name not in by_name:
                raise invalid(
                    f"outputs[{index}].name", "unknown", f"no output {choice.name!r}; the model has {', '.join(by_name)}"
                )
    outputs, blobs = [], []
    for choice in chosen:
        tensor = by_name[choice.name]
        if choice.binary:
            blob = _to_binary(tensor)
            blobs.append(blob)
            outputs.append(
                ResponseOutput(
                    name=tensor.name,
                    datatype=tensor.datatype,
                    shape=list(tensor.shape),
                    parameters={"binary_data_size": len(blob)},
                )
            )
        else:
            outputs.append(
                ResponseOutput(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape), data=tensor.values)
            )
    header = InferenceResponse(
        model_name=model_name, id=request.id, parameters=parameters, outputs=outputs
    ).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return header, JSON_MEDIA_TYPE, {}
    return header + b"".join(blobs), BINARY_MEDIA_TYPE, {HEADER_LENGTH: str(len(header))}
