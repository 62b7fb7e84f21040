"""ASGI middleware: caps request bodies before parsing; gives each request an id, a log line and metrics."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import request_id_var

access_logger = logging.getLogger("loraswap.access")

REQUEST_ID_HEADER = b"x-request-id"


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once the streamed body passes the cap. An HTTPException, so FastAPI's body
    parsing lets it through (it turns any other exception into a 400) and the 413 handler answers."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is larger than {max_bytes} bytes")
        self.details = {"max_request_bytes": max_bytes}


class BodyLimitMiddleware:
    """Answers 413 for a body over `max_bytes`, by Content-Length up front or by counting the stream,
    so an oversized request is never buffered whole nor parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False
            if too_large:
                await _reject(send, self.max_bytes)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send, self.max_bytes)


async def _reject(send: Send, max_bytes: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"request body is larger than {max_bytes} bytes",
                "details": {"max_request_bytes": max_bytes},
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Per request: takes X-Request-ID from the client (or makes one) and echoes it back, puts it on
    every log line written meanwhile, writes one access line (never the body), and counts and times
    the request in the metrics, labelled by the route's template (never the raw path, which would let
    callers create unbounded label values)."""

    def __init__(self, app: ASGIApp, metrics, templates: Callable[[], list[str]] | None = None):
        self.app = app
        self.metrics = metrics
        self._template_source = templates
        self._patterns: list[tuple[re.Pattern, str]] | None = None

    def _template(self, scope: Scope, path: str) -> str:
        """The matched route's template; for what never reached routing (a 413 from the body limit,
        /openapi.json, static files) the template the path belongs to, never the raw path."""
        route = scope.get("route")
        if route is not None:
            return route.path
        if self._patterns is None:  # built on first use: every route is registered by then
            templates = self._template_source() if self._template_source else []
            self._patterns = [(compile_path(t)[0], t) for t in sorted(templates, key=len, reverse=True)]
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        path = scope.get("path", "")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            template = self._template(scope, path)
            method = scope.get("method", "GET")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(elapsed)
            access_logger.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "route": template,
                    "status": status,
                    "latency_ms": round(elapsed * 1e3, 2),
                    "adapter": state.get("adapter"),
                    "model_version": state.get("model_version"),
                },
            )
            request_id_var.reset(token)
