"""The OpenAPI document tells only the truth: every documented error is one the route can return, in
the service's own error envelope (FastAPI documents its own `HTTPValidationError` for every route
with parameters, although our handler answers validation errors with `ErrorResponse`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas.errors import ErrorResponse

_FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"
_ERROR_RESPONSE = f"#/components/schemas/{ErrorResponse.__name__}"


def _can_fail_validation(operation: dict[str, Any]) -> bool:
    """A body, or a parameter that is required or typed other than a plain string, can be invalid."""
    if "requestBody" in operation:
        return True
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "path":
            continue  # a str path segment always validates (routes check names themselves)
        if parameter.get("required") or parameter.get("schema", {}).get("type") not in (None, "string"):
            return True
    return False


def truthful_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            documented = responses.get("422")
            if documented is None:
                continue
            content = documented.get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref") != _FASTAPI_VALIDATION:
                continue
            if _can_fail_validation(operation):
                content["schema"] = {"$ref": _ERROR_RESPONSE}
                documented["description"] = "Invalid input; `error.details.fields` names each offending field."
            else:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_openapi(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
