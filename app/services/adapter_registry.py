"""The adapter registry: which adapters are known, their metadata and lifecycle state, and which
loaded weights a name resolves to right now. Residency (what is on the device) lives elsewhere."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, replace
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
    UNLOADED = "unloaded"  # only in the answer to the DELETE that removed it


class LoadedAdapter(Protocol):
    """What the registry needs of loaded weights (app.inference.adapter_loader.AdapterWeights)."""

    name: str
    labels: tuple[str, ...]
    task: str
    rank: int
    target_modules: tuple[str, ...]
    base_id: str
    size_bytes: int
    metrics: dict[str, float]
    path: Path


class AdapterLoader(Protocol):
    def read_adapter(self, name: str, path: Path, labels: list[str] | None = None) -> LoadedAdapter: ...


class ResidencyView(Protocol):
    def is_resident(self, adapter: Any) -> bool: ...
    def is_pinned(self, name: str) -> bool: ...
    def retire(self, adapter: Any) -> None: ...


class LoadObserver(Protocol):
    """Told about every load, at startup or through the API (the metrics implement it)."""

    def observe_adapter_load(self, outcome: str, seconds: float | None) -> None: ...


@dataclass
class AdapterEntry:
    """One name. `adapter` is the weights it serves now (None unless ready); `error` is why the last
    load of this name failed (kept while an older version goes on serving); `served_pairs` counts pairs
    answered by the current weights, so a replace starts it again."""

    name: str
    state: AdapterState
    path: Path
    adapter: LoadedAdapter | None = None
    error: str | None = None
    served_pairs: int = 0


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

    def __init__(self, loader: AdapterLoader, residency: ResidencyView, *, metrics: LoadObserver | None = None):
        self._loader = loader
        self._residency = residency
        self._metrics = metrics
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

    def ready_adapter(self, name: str | None) -> LoadedAdapter | None:
        with self._lock:
            entry = self._entries.get(name) if name else None
            return entry.adapter if entry is not None and entry.state is AdapterState.READY else None

    def any_ready_adapter(self) -> LoadedAdapter | None:
        with self._lock:
            return next((e.adapter for e in self._entries.values() if e.state is AdapterState.READY), None)

    def record_served(self, adapter: LoadedAdapter, pairs: int) -> None:
        """Count pairs answered by `adapter`, if its name still serves exactly these weights."""
        with self._lock:
            entry = self._entries.get(adapter.name)
            if entry is not None and entry.adapter is adapter:
                entry.served_pairs += pairs

    def resolve(self, name: str) -> LoadedAdapter:
        """The weights a request for `name` runs with now."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.state is AdapterState.READY and entry.adapter is not None:
                return entry.adapter
        available = self.ready_names()
        reason = f" (it failed to load: {entry.error})" if entry is not None and entry.error else ""
        raise AdapterNotFound(
            f"no adapter named {name!r} is ready{reason}; available: {', '.join(available) or 'none'}",
            details={"adapter": name, "available": available},
        )

    def is_pinned(self, name: str) -> bool:
        return self._residency.is_pinned(name)

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

    def load(self, name: str, path: Path, labels: list[str] | None = None) -> AdapterEntry:
        """Validate and load `path` as `name`, replacing any adapter of that name atomically. `labels`
        name the classes of a plain PEFT adapter that carries none."""
        check_name(name)
        with self._lock:
            if name in self._loading:
                raise AdapterConflict(f"adapter {name!r} is already being loaded", details={"adapter": name})
            self._loading.add(name)
            previous = self._entries.get(name)
            if previous is None:
                self._entries[name] = AdapterEntry(name, AdapterState.LOADING, path)
        started = time.perf_counter()
        try:
            try:
                adapter = self._loader.read_adapter(name, path, labels)
            except Exception as exc:  # the loader's AdapterLoadError carries kind and message
                kind = getattr(exc, "kind", None)
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                error = AdapterNotFound if kind == "not_found" else AdapterInvalid
                self._record_failure(name, path, previous, message, keep_trace=error is AdapterInvalid)
                self._observe(error.code, None)
                raise error(message, details={"adapter": name, "path": str(path)}) from None
            entry = AdapterEntry(name, AdapterState.READY, path, adapter=adapter)
            with self._lock:
                self._entries[name] = entry
            self._observe("ok", time.perf_counter() - started)
            if previous is not None and previous.adapter is not None:
                self._residency.retire(previous.adapter)
            logger.info("adapter %s %s from %s", name, "replaced" if previous else "loaded", path)
            return entry
        finally:
            with self._lock:
                self._loading.discard(name)

    def _record_failure(
        self, name: str, path: Path, previous: AdapterEntry | None, message: str, *, keep_trace: bool
    ) -> None:
        """An invalid adapter leaves a trace: a new name becomes FAILED with the reason; a refused
        replace keeps the old weights serving and records why. Nothing at the path leaves no trace."""
        with self._lock:
            if previous is not None and previous.state is AdapterState.READY:
                if keep_trace:
                    previous.error = f"a replacement from {path} was refused: {message}"
            elif keep_trace:
                self._entries[name] = AdapterEntry(name, AdapterState.FAILED, path, error=message)
            elif previous is None:
                self._entries.pop(name, None)  # the LOADING placeholder

    def _observe(self, outcome: str, seconds: float | None) -> None:
        if self._metrics is not None:
            self._metrics.observe_adapter_load(outcome, seconds)

    def close(self) -> None:
        """Nothing runs in the background yet; here for the runtime's shutdown order."""

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
        return replace(entry, state=AdapterState.UNLOADED)
