"""Typed service errors: each carries a stable code and an HTTP status, mapped to a response once."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service answers with on purpose."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.retry_after_s = retry_after_s


class InvalidInput(ServiceError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class AdapterNotFound(ServiceError):
    status_code = 404
    code = "adapter_not_found"


class AdapterConflict(ServiceError):
    status_code = 409
    code = "adapter_conflict"


class AdapterInvalid(ServiceError):
    """The adapter files exist but cannot serve on this base (bad format, fingerprint, shapes...)."""

    status_code = 422
    code = "adapter_invalid"


class PathNotAllowed(ServiceError):
    status_code = 403
    code = "path_not_allowed"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, details: dict[str, Any] | None = None):
        super().__init__(message, details=details, retry_after_s=retry_after_s)


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"

    def __init__(self, message: str, *, retry_after_s: int = 5, details: dict[str, Any] | None = None):
        super().__init__(message, details=details, retry_after_s=retry_after_s)


class InferenceFailed(ServiceError):
    """A batch raised inside the engine; every member of that batch gets this error."""

    status_code = 500
    code = "inference_failed"


class ClientGone(ServiceError):
    """The client disconnected while its request waited; nobody reads this answer (nginx's 499)."""

    status_code = 499
    code = "client_closed_request"
