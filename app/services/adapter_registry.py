"""The adapter registry: which adapters are known, their metadata and lifecycle state, and which
loaded weights a name resolves to right now. Residency (what is on the device) lives elsewhere."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from app.errors import AdapterConflict, AdapterInvalid, AdapterNotFound, InvalidInput

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class AdapterState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class LoadedAdapter(Protocol):
    """What the registry needs of loaded weights (app.inference.adapter_loader.AdapterWeights)."""

    name: str
    labels: tuple[str, ...]
    task: str
    rank: int
    target_modules: tuple[str, ...]
    base_id: str
    size_bytes: int
    metadata: dict[str, Any]
    path: Path


class AdapterLoader(Protocol):
    def load_adapter(self, name: str, path: Path) -> LoadedAdapter: ...


class ResidencyView(Protocol):
    def is_resident(self, adapter: Any) -> bool: ...
    def retire(self, adapter: Any) -> None: ...


@dataclass
class AdapterEntry:
    name: str
    state: AdapterState
    path: Path
    adapter: LoadedAdapter | None = None
    error: str | None = None
    requests: int = 0
    loaded_at: float | None = None


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            "adapter names are 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
            details={"fields": [{"field": "name", "type": "slug", "message": "not a valid adapter name"}]},
        )
    return name


class AdapterRegistry:
    """Invariants: a name resolves only to fully validated weights (a load is invisible until it
    succeeds); a replace swaps the weights in one assignment, so each request sees the old or the new
    adapter, never a mix; a request keeps the weights it resolved even if the name is replaced or
    unloaded while it is queued; at most one load per name runs at a time (others get 409).
    """

    def __init__(self, loader: AdapterLoader, residency: ResidencyView, pinned: set[str] | None = None):
        self._loader = loader
        self._residency = residency
        self._pinned = set(pinned or ())
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._loading: set[str] = set()

    # -- reading -------------------------------------------------------------------------------------
    def ready_names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.state is AdapterState.READY)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def entry(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(
                f"no adapter named {name!r}; available: {', '.join(self.ready_names()) or 'none'}",
                details={"adapter": name, "available": self.ready_names()},
            )
        return entry

    def resolve(self, name: str) -> LoadedAdapter:
        """The weights a request for `name` runs with, counted as one request."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.state is AdapterState.READY and entry.adapter is not None:
                entry.requests += 1
                return entry.adapter
        available = self.ready_names()
        reason = f" (it failed to load: {entry.error})" if entry is not None and entry.error else ""
        raise AdapterNotFound(
            f"no adapter named {name!r} is ready{reason}; available: {', '.join(available) or 'none'}",
            details={"adapter": name, "available": available},
        )

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def is_resident(self, entry: AdapterEntry) -> bool:
        return entry.adapter is not None and self._residency.is_resident(entry.adapter)

    # -- changing (blocking: call off the event loop) ------------------------------------------------
    def discover(self, directory: Path) -> None:
        """Load every adapter directory under `directory`; a bad one is recorded as failed."""
        if not directory.is_dir():
            logger.warning("adapters directory %s does not exist; no adapters discovered", directory)
            return
        for child in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not (child / "adapter_config.json").exists() and not (child / "metadata.json").exists():
                continue
            name = child.name
            if not NAME_PATTERN.fullmatch(name):
                logger.warning("skipping adapter directory %s: not a valid adapter name", child)
                continue
            try:
                self.load(name, child)
            except (AdapterInvalid, AdapterNotFound) as exc:
                logger.error("adapter %s failed to load: %s", name, exc.message)
                with self._lock:
                    self._entries[name] = AdapterEntry(name, AdapterState.FAILED, child, error=exc.message)

    def load(self, name: str, path: Path) -> AdapterEntry:
        """Validate and load `path` as `name`, replacing any adapter of that name atomically."""
        check_name(name)
        with self._lock:
            if name in self._loading:
                raise AdapterConflict(f"adapter {name!r} is already being loaded", details={"adapter": name})
            self._loading.add(name)
            previous = self._entries.get(name)
            if previous is None:
                self._entries[name] = AdapterEntry(name, AdapterState.LOADING, path)
        try:
            try:
                adapter = self._loader.load_adapter(name, path)
            except Exception as exc:  # the loader's AdapterLoadError carries kind and message
                kind = getattr(exc, "kind", None)
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if previous is None:
                        del self._entries[name]
                if kind == "not_found":
                    raise AdapterNotFound(message, details={"adapter": name, "path": str(path)}) from None
                raise AdapterInvalid(message, details={"adapter": name, "path": str(path)}) from None
            entry = AdapterEntry(
                name,
                AdapterState.READY,
                path,
                adapter=adapter,
                requests=previous.requests if previous else 0,
                loaded_at=time.time(),
            )
            with self._lock:
                self._entries[name] = entry
            if previous is not None and previous.adapter is not None:
                self._residency.retire(previous.adapter)
            logger.info("adapter %s %s from %s", name, "replaced" if previous else "loaded", path)
            return entry
        finally:
            with self._lock:
                self._loading.discard(name)

    def unload(self, name: str) -> AdapterEntry:
        with self._lock:
            if name in self._loading:
                raise AdapterConflict(f"adapter {name!r} is being loaded; retry", details={"adapter": name})
            entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterNotFound(
                f"no adapter named {name!r}; available: {', '.join(self.ready_names()) or 'none'}",
                details={"adapter": name, "available": self.ready_names()},
            )
        if entry.adapter is not None:
            self._residency.retire(entry.adapter)
        logger.info("adapter %s unloaded", name)
        return entry
