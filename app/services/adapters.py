"""Adapter management rules: who may change adapters, which paths may be loaded, and the views."""

from __future__ import annotations

import hmac
import ipaddress
import time
from pathlib import Path

import anyio

from app.errors import Forbidden, PathNotAllowed, ServiceError, Unauthorized
from app.services.adapter_registry import AdapterEntry, AdapterRegistry, check_name
from app.services.metrics import Metrics


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:  # not a directory (yet): the loader says what is missing
        return []


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (RuntimeError, OSError):  # a symlink loop leads nowhere inside
        return False


class AdapterService:
    def __init__(
        self, registry: AdapterRegistry, *, roots: list[Path], admin_token: str | None, metrics: Metrics | None = None
    ):
        self.registry = registry
        self.metrics = metrics
        self.roots = [Path(r).resolve() for r in roots]
        self.admin_token = admin_token

    def authorize(self, authorization: str | None, client_host: str | None) -> None:
        """With a token configured, require `Authorization: Bearer <token>`; without one, loopback only."""
        if self.admin_token:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("adapter management needs an Authorization: Bearer token")
            if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
                raise Forbidden("the bearer token is not valid for adapter management")
            return
        if not is_loopback(client_host):
            raise Forbidden("adapter management without a configured admin token is allowed from loopback only")

    def resolve_path(self, raw: str) -> Path:
        """The adapter directory, if and only if it lies under a configured root (symlinks resolved)."""
        if "\x00" in raw:
            raise PathNotAllowed("the path contains a NUL byte")
        try:
            candidate = Path(raw).expanduser()
            if not candidate.is_absolute():
                candidate = self.roots[0] / candidate
            resolved = candidate.resolve()
        except (RuntimeError, OSError, ValueError):  # an unknown ~user, a symlink loop
            raise PathNotAllowed(
                "the path cannot be resolved", details={"roots": [str(r) for r in self.roots]}
            ) from None
        for root in self.roots:
            if resolved == root or not resolved.is_relative_to(root):
                continue
            # The loader reads the directory's own files: a symlinked one must not lead out of the root either.
            escaping = sorted(p.name for p in _children(resolved) if not _inside(p, root))
            if escaping:
                raise PathNotAllowed(
                    "files of the adapter directory lead outside the adapter roots",
                    details={"files": escaping, "roots": [str(r) for r in self.roots]},
                )
            return resolved
        raise PathNotAllowed(
            "adapters may only be loaded from a directory under the configured adapter roots",
            details={"roots": [str(r) for r in self.roots]},
        )

    async def load(self, name: str, raw_path: str) -> AdapterEntry:
        check_name(name)
        path = self.resolve_path(raw_path)
        started = time.perf_counter()
        try:
            entry = await anyio.to_thread.run_sync(self.registry.load, name, path)
        except ServiceError as exc:
            if self.metrics is not None:
                self.metrics.adapter_loads.labels(exc.code).inc()
            raise
        if self.metrics is not None:
            self.metrics.adapter_loads.labels("ok").inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return entry

    async def unload(self, name: str) -> AdapterEntry:
        return self.registry.unload(name)
