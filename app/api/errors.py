"""Maps every error to the one JSON error body, once: typed service errors, validation, the unexpected."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError

logger = logging.getLogger(__name__)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "transactions", 3, "V1") -> "transactions[3].V1"; the "body" prefix says nothing.
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
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
    fields = []
    for err in exc.errors():
        # A body that is not JSON at all is located at its parse position; the field is the body.
        loc = ("body",) if err.get("type") == "json_invalid" else tuple(err.get("loc", ()))
        fields.append(
            {
                "field": _field_name(loc),
                "type": err.get("type", "value_error"),
                "message": _safe(err.get("msg", "invalid")),
            }
        )
    return {"fields": fields}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        if exc.status_code >= 500:
            logger.warning("request failed: %s %s", exc.code, exc.message)
        return JSONResponse(
            error_body(exc.code, exc.message, {k: _safe_tree(v) for k, v in exc.details.items()}),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc)
        names = ", ".join(f["field"] for f in details["fields"][:10])
        return JSONResponse(error_body("invalid_input", f"invalid request: {names}", details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)


def _safe_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _safe_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_tree(v) for v in value]
    return _safe(value)
