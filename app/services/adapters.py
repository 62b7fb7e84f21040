"""Adapter management rules: who may change adapters, which paths may be loaded, and how an adapter is
described to clients."""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import anyio

from app.errors import Forbidden, PathNotAllowed, Unauthorized
from app.schemas.adapters import AdapterInfo
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
        self._registry = registry
        self._metrics = metrics
        self.roots = [Path(r).resolve() for r in roots]
        self._admin_token = admin_token

    # -- views ------------------------------------------------------------------------------------------
    def describe(self, name: str) -> AdapterInfo:
        """One adapter as clients see it; AdapterNotFound if the name is unknown."""
        return self._info(self._registry.entry(name))

    def describe_all(self) -> list[AdapterInfo]:
        return [self._info(entry) for entry in self._registry.entries()]

    def _info(self, entry: AdapterEntry) -> AdapterInfo:
        adapter, summary = entry.adapter, entry.summary
        tier = self._registry.tier(entry)
        return AdapterInfo(
            name=entry.name,
            task=adapter.task if adapter else summary.task,
            labels=list(adapter.labels if adapter else summary.labels or entry.labels_override or ()),
            base=adapter.base_id if adapter else summary.base_id,
            rank=adapter.rank if adapter else summary.rank,
            target_modules=list(adapter.target_modules if adapter else summary.target_modules),
            size_bytes=adapter.size_bytes if adapter else summary.size_bytes,
            state=entry.state.value,
            tier=tier,
            resident=tier == "device",
            pinned=self._registry.is_pinned(entry.name),
            version=entry.version,
            requests=entry.served_pairs,
            loads=entry.loads,
            host_evictions=entry.host_evictions,
            path=str(entry.path),
            error=entry.error,
            metrics=(adapter.metrics if adapter else summary.metrics) or None,
        )

    # -- management ---------------------------------------------------------------------------------------
    def authorize(self, authorization: str | None, client_host: str | None) -> None:
        """With a token configured, require `Authorization: Bearer <token>`; without one, loopback only.
        Every refusal is counted."""
        try:
            self._check_caller(authorization, client_host)
        except (Unauthorized, Forbidden) as exc:
            if self._metrics is not None:
                self._metrics.observe_management_refused(exc.code)
            raise

    def _check_caller(self, authorization: str | None, client_host: str | None) -> None:
        if self._admin_token:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("adapter management needs an Authorization: Bearer token")
            if not hmac.compare_digest(token.strip().encode(), self._admin_token.encode()):
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
                # Relative to each root in order (LORASWAP_ADAPTERS_DIR first): the first that has it.
                tries = [root / candidate for root in self.roots]
                candidate = next((t for t in tries if t.exists()), tries[0])
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

    async def load(self, name: str, raw_path: str, labels: list[str] | None = None) -> AdapterInfo:
        """Validate and load (or replace) `name` from a directory under the roots; the registry counts it.
        `labels` name the classes of a plain PEFT adapter that carries none."""
        check_name(name)
        path = self.resolve_path(raw_path)
        entry = await anyio.to_thread.run_sync(self._registry.load, name, path, labels)
        return self._info(entry)

    async def unload(self, name: str) -> AdapterInfo:
        info = self._info(self._registry.unload(name))
        if self._metrics is not None:
            # Only a DELETE frees the adapter's own metric series; a PUT over a name keeps counting into them.
            self._metrics.adapter_labels.forget(name)
        return info
