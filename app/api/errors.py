"""Maps every error to the one JSON error body, once: typed service errors, validation, the unexpected.
Under /v2 (the Open Inference Protocol) the body is that protocol's `{"error": "..."}`, same status codes."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.errors import ServiceError

logger = logging.getLogger(__name__)

MAX_FIELDS_REPORTED = 50
# Field names quoted in a 422's message; the rest are counted ("and 19 more").
MAX_FIELDS_IN_MESSAGE = 10
JSON_EXPECTED = "expected a JSON body with Content-Type: application/json"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "transactions", 3, "V1") -> "transactions[3].V1"; the leading location ("body", "query",
    # "path", "header") says nothing. Only the leading one: a body field may be named "path".
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _safe(value: Any) -> Any:
    """Error details must stay JSON-serialisable: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def validation_details(exc: RequestValidationError) -> dict[str, Any]:
    # The offending input is never echoed: it may be huge, secret, or a NaN that JSON cannot carry.
    # At most MAX_FIELDS_REPORTED are listed, so the answer stays small whatever the body held.
    errors = exc.errors()
    fields = []
    for err in errors[:MAX_FIELDS_REPORTED]:
        # A body that is not JSON at all is located at its parse position; the field is the body.
        loc = ("body",) if err.get("type") == "json_invalid" else tuple(err.get("loc", ()))
        if loc == ("body",) and isinstance(err.get("input"), (bytes, bytearray)):
            # FastAPI parses a body as JSON only when its content type says so; other bodies reach the
            # model as raw bytes, and "Input should be a valid dictionary" would not tell the client why.
            fields.append({"field": "body", "type": "content_type", "message": JSON_EXPECTED})
            continue
        fields.append(
            {
                "field": _field_name(loc),
                "type": err.get("type", "value_error"),
                "message": _safe(err.get("msg", "invalid")),
            }
        )
    details: dict[str, Any] = {"fields": fields}
    if len(errors) > MAX_FIELDS_REPORTED:
        details["fields_not_listed"] = len(errors) - MAX_FIELDS_REPORTED
    return details


def validation_message(details: dict[str, Any]) -> str:
    """"invalid request: a, b, c" with at most MAX_FIELDS_IN_MESSAGE names, then how many more."""
    fields = details["fields"]
    total = len(fields) + details.get("fields_not_listed", 0)
    names = ", ".join(f["field"] for f in fields[:MAX_FIELDS_IN_MESSAGE])
    more = f" and {total - MAX_FIELDS_IN_MESSAGE} more" if total > MAX_FIELDS_IN_MESSAGE else ""
    if len(fields) == 1 and fields[0]["type"] == "content_type":
        return f"invalid request: {JSON_EXPECTED}"
    return f"invalid request: {names}{more}"


def is_protocol_v2(request: Request) -> bool:
    path = request.url.path
    return path == "/v2" or path.startswith("/v2/")


def _respond(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one place an error becomes a response: our envelope, or the v2 protocol's under /v2."""
    body = {"error": message} if is_protocol_v2(request) else error_body(code, message, details)
    return JSONResponse(body, status_code=status_code, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        if exc.status_code >= 500:
            logger.warning("request failed: %s %s", exc.code, exc.message)
        details = {k: _safe_tree(v) for k, v in exc.details.items()}
        return _respond(request, exc.status_code, exc.code, exc.message, details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc)
        message = validation_message(details)
        if is_protocol_v2(request):  # one string is all the protocol carries: say why, too
            message += ": " + "; ".join(str(f["message"]) for f in details["fields"][:MAX_FIELDS_IN_MESSAGE])
        return _respond(request, 422, "invalid_input", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unparsable = _unparsable_body(exc)
        if unparsable is not None:
            details = {"fields": [{"field": "body", "type": "json_invalid", "message": unparsable}]}
            return _respond(request, 422, "invalid_input", f"invalid request: {unparsable}", details)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _respond(request, exc.status_code, code, str(exc.detail), getattr(exc, "details", None), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _respond(request, 500, "internal_error", "internal error")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first route that
    matched the path (so `/adapters/{name}` said `Allow: GET` though PUT and DELETE are served there)."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _leaf_routes(routes):
    """The routes themselves: FastAPI (0.16x) keeps an included router as one entry that matches any path
    and names no methods; its own routes (their paths already carry the router's prefix) are inside."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a JSON body, when that is what this 400 is. FastAPI answers 400 for a
    body that fails before JSON decoding proper (invalid UTF-8, nesting deeper than the parser's
    recursion limit, an integer literal over Python's digit limit); to the client that is invalid
    input like any other malformed JSON, so it gets the same 422."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the body nests too deeply"
    if isinstance(cause, ValueError):
        return "the body is not valid JSON (a number too long to parse?)"
    return None


def _safe_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _safe_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_tree(v) for v in value]
    return _safe(value)
