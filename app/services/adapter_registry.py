"""The adapter registry: every adapter known on disk (from its small files), which of them hold validated
weights in host memory (a bounded LRU), their lifecycle state, and single-flight loading on a small
loader pool. The device tier (slots) lives in app.inference.slots; the registry only tells it to retire."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from app.artifacts import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, AdapterMetadata
from app.errors import AdapterConflict, AdapterInvalid, AdapterNotFound, InvalidInput

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class AdapterState(str, Enum):
    KNOWN = "known"  # on disk; weights not read yet (or evicted from the host)
    LOADING = "loading"
    READY = "ready"  # validated weights in host memory
    FAILED = "failed"  # refused; retried only when its files change
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


class DeviceView(Protocol):
    def is_resident(self, adapter: Any) -> bool: ...
    def is_pinned(self, name: str) -> bool: ...
    def retire(self, adapter: Any) -> None: ...


class LoadObserver(Protocol):
    """Told about every disk-to-host load and host eviction (the metrics implement it)."""

    def observe_adapter_load(self, outcome: str, seconds: float | None) -> None: ...
    def observe_host_eviction(self) -> None: ...


@dataclass
class AdapterSummary:
    """What the small files say, before any weights are read."""

    labels: tuple[str, ...] = ()
    task: str | None = None
    base_id: str | None = None
    rank: int | None = None
    target_modules: tuple[str, ...] = ()
    size_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class AdapterEntry:
    """One name. `adapter` is the weights it serves now (host tier; None on disk only); `error` is why the
    last load failed (kept while an older version goes on serving); `version` grows with every PUT;
    `served_pairs` counts pairs answered by the current version; `in_use` counts requests holding it."""

    name: str
    state: AdapterState
    path: Path
    summary: AdapterSummary = field(default_factory=AdapterSummary)
    adapter: LoadedAdapter | None = None
    labels_override: list[str] | None = None
    error: str | None = None
    files_signature: tuple = ()
    version: int = 1
    served_pairs: int = 0
    loads: int = 0
    host_evictions: int = 0
    in_use: int = 0


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            "adapter names are 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
            details={"fields": [{"field": "name", "type": "slug", "message": "not a valid adapter name"}]},
        )
    return name


def files_signature(directory: Path) -> tuple:
    """(name, size, mtime) of the adapter's files: a failed adapter is retried only when this changes."""
    signature = []
    for name in (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE):
        try:
            stat = (directory / name).stat()
            signature.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append((name, None, None))
    return tuple(signature)


def summarize(directory: Path) -> AdapterSummary:
    """The listing of a disk-only adapter, from metadata.json (or the PEFT config): no weights read.
    Raises ValueError when metadata.json is present but invalid."""
    summary = AdapterSummary()
    try:
        summary.size_bytes = (directory / WEIGHTS_FILE).stat().st_size
    except OSError:
        pass
    if (directory / METADATA_FILE).is_file():
        try:
            meta = AdapterMetadata.read(directory)
        except (ValidationError, ValueError, OSError) as exc:
            raise ValueError(f"{METADATA_FILE} is not valid: {exc}".splitlines()[0]) from None
        summary.labels, summary.task, summary.base_id = tuple(meta.labels), meta.task, meta.base.id
        summary.metrics = meta.numeric_metrics()
        if meta.lora is not None:
            summary.rank, summary.target_modules = meta.lora.r, tuple(sorted(meta.lora.target_modules))
    return summary


class AdapterLease:
    """The adapters one request runs with, held (never evicted from the host) until `release`."""

    def __init__(self, registry: AdapterRegistry, entries: list[AdapterEntry]):
        self._registry = registry
        self._entries = entries
        self._released = False

    async def weights(self) -> dict[str, LoadedAdapter]:
        """Wait until every adapter of the request is in host memory (loading misses off the event loop)."""
        pending = {e.name: self._registry._weights_future(e) for e in self._entries}
        return {name: await asyncio.wrap_future(future) for name, future in pending.items()}

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self._entries)


class AdapterRegistry:
    """Invariants: a name resolves only to fully validated weights; a replace swaps them in one
    assignment, so each request sees the old or the new version, never a mix; at most one load per name
    runs at a time (concurrent first requests share it; a PUT during one gets 409); at most
    `max_host` adapters hold weights, except while more are leased by requests (never evicted) or pinned.
    """

    def __init__(
        self,
        loader: AdapterLoader,
        device: DeviceView,
        *,
        max_host: int = 64,
        roots: Iterable[Path] = (),
        loader_threads: int = 2,
        metrics: LoadObserver | None = None,
        on_retire: Callable[[Any], None] | None = None,
    ):
        self._loader = loader
        self._device = device
        self._max_host = max_host
        self._roots = [Path(r) for r in roots]
        self._metrics = metrics
        self._on_retire = on_retire or device.retire
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._host: OrderedDict[str, None] = OrderedDict()  # names holding weights, least recent first
        self._loads: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="loraswap-loader")

    # -- reading -------------------------------------------------------------------------------------
    def servable_names(self) -> list[str]:
        """Names a request can use, now or after a load (known, loading or ready; not failed)."""
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.state is not AdapterState.FAILED)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [replace(self._entries[n]) for n in sorted(self._entries)]

    def entry(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
            copy = replace(entry) if entry is not None else None
        if copy is None:
            raise self._not_found(name)
        return copy

    def tier(self, entry: AdapterEntry) -> str:
        if entry.adapter is not None and self._device.is_resident(entry.adapter):
            return "device"
        return "host" if entry.adapter is not None else "disk"

    def is_pinned(self, name: str) -> bool:
        return self._device.is_pinned(name)

    def host_count(self) -> int:
        with self._lock:
            return len(self._host)

    def ready_adapter(self, name: str | None) -> LoadedAdapter | None:
        """The weights of `name` if they are in host memory now (no load started)."""
        with self._lock:
            entry = self._entries.get(name) if name else None
            return entry.adapter if entry is not None else None

    def record_served(self, adapter: LoadedAdapter, pairs: int) -> None:
        """Count pairs answered by `adapter`, if its name still serves exactly these weights."""
        with self._lock:
            entry = self._entries.get(adapter.name)
            if entry is not None and entry.adapter is adapter:
                entry.served_pairs += pairs

    # -- requests ------------------------------------------------------------------------------------
    def lease(self, names: Iterable[str]) -> AdapterLease:
        """Hold the named adapters for one request. Unknown names raise AdapterNotFound (after looking
        for a directory of that name added since start-up); a failed adapter whose files have not
        changed raises AdapterInvalid with its reason, without another load."""
        entries = []
        try:
            for name in dict.fromkeys(names):
                entry = self._usable_entry(name)
                entries.append(entry)
        except Exception:
            self._release(entries)
            raise
        return AdapterLease(self, entries)

    def load_now(self, lease: AdapterLease) -> dict[str, LoadedAdapter]:
        """Blocking form of `lease.weights()`, for start-up (not on the event loop)."""
        return {e.name: self._weights_future(e).result() for e in lease._entries}

    def _usable_entry(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            entry = self._find_new(name)
        with self._lock:
            if entry.state is AdapterState.FAILED:
                if files_signature(entry.path) == entry.files_signature:
                    raise AdapterInvalid(
                        f"adapter {name!r} cannot serve: {entry.error}", details={"adapter": name, "path": str(entry.path)}
                    )
                entry.state, entry.error = AdapterState.KNOWN, None  # its files changed: try again
            entry.in_use += 1
            return entry

    def _find_new(self, name: str) -> AdapterEntry:
        """An adapter directory added under a root after start-up is found on its first request."""
        if NAME_PATTERN.fullmatch(name):
            for root in self._roots:
                candidate = root / name
                if (candidate / CONFIG_FILE).is_file():
                    self._register(name, candidate)
                    with self._lock:
                        entry = self._entries.get(name)
                    if entry is not None:
                        return entry
        raise self._not_found(name)

    def _weights_future(self, entry: AdapterEntry) -> Future:
        """The weights of a leased entry: done at once when on the host, else one load shared by all."""
        with self._lock:
            if entry.adapter is not None and entry.state is AdapterState.READY:
                self._host.move_to_end(entry.name)
                done: Future = Future()
                done.set_result(entry.adapter)
                return done
            future = self._loads.get(entry.name)
            if future is None:
                future = self._loads[entry.name] = Future()
                entry.state = AdapterState.LOADING
                path, labels = entry.path, entry.labels_override
                self._pool.submit(self._load_into, entry, path, labels, future)
            return future

    def _load_into(self, entry: AdapterEntry, path: Path, labels: list[str] | None, future: Future) -> None:
        """Loader thread: read and validate, then publish to the entry (if it still names it)."""
        started = time.perf_counter()
        try:
            adapter = self._loader.read_adapter(entry.name, path, labels)
        except Exception as exc:  # the loader's AdapterLoadError carries kind and message
            error = self._as_service_error(entry.name, path, exc)
            with self._lock:
                entry.state, entry.error = AdapterState.FAILED, error.message
                entry.files_signature = files_signature(path)
                self._loads.pop(entry.name, None)
            self._observe(error.code, None)
            logger.error("adapter %s failed to load from %s: %s", entry.name, path, error.message)
            future.set_exception(error)
            return
        with self._lock:
            self._loads.pop(entry.name, None)
            evicted = []
            if self._entries.get(entry.name) is entry:  # not unloaded meanwhile: cache it on the host
                entry.adapter, entry.state, entry.error = adapter, AdapterState.READY, None
                entry.loads += 1
                self._host[entry.name] = None
                self._host.move_to_end(entry.name)
                evicted = self._evict_host()
        self._observe("ok", time.perf_counter() - started)
        for old in evicted:
            self._on_retire(old)
        future.set_result(adapter)

    def _release(self, entries: list[AdapterEntry]) -> None:
        with self._lock:
            for entry in entries:
                entry.in_use -= 1
            evicted = self._evict_host()
        for old in evicted:
            self._on_retire(old)

    def _evict_host(self) -> list[LoadedAdapter]:
        """Least recently used first; never pinned, never leased. Called with the lock held."""
        overflow = len(self._host) - self._max_host
        evicted = []
        for name in list(self._host):
            if overflow <= 0:
                break
            entry = self._entries[name]
            if entry.in_use > 0 or self._device.is_pinned(name):
                continue
            del self._host[name]
            evicted.append(entry.adapter)
            entry.adapter, entry.state = None, AdapterState.KNOWN
            entry.host_evictions += 1
            overflow -= 1
            if self._metrics is not None:
                self._metrics.observe_host_eviction()
        return evicted

    # -- management (blocking: call off the event loop) -------------------------------------------------
    def discover(self, directory: Path) -> None:
        """Register every adapter directory under `directory` from its small files; weights stay on disk."""
        if not directory.is_dir():
            logger.warning("adapters directory %s does not exist; no adapters discovered", directory)
            return
        for child in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not (child / CONFIG_FILE).exists() and not (child / METADATA_FILE).exists():
                continue
            if not NAME_PATTERN.fullmatch(child.name):
                logger.warning("skipping adapter directory %s: not a valid adapter name", child)
                continue
            self._register(child.name, child)

    def _register(self, name: str, path: Path) -> None:
        try:
            entry = AdapterEntry(name, AdapterState.KNOWN, path, summary=summarize(path))
        except ValueError as exc:
            entry = AdapterEntry(name, AdapterState.FAILED, path, error=str(exc), files_signature=files_signature(path))
            logger.error("adapter %s cannot serve: %s", name, exc)
        with self._lock:
            self._entries.setdefault(name, entry)

    def load(self, name: str, path: Path, labels: list[str] | None = None) -> AdapterEntry:
        """Validate and load `path` as `name` now (a PUT), replacing any adapter of that name atomically.
        `labels` name the classes of a plain PEFT adapter that carries none."""
        check_name(name)
        with self._lock:
            if name in self._loads:
                raise AdapterConflict(f"adapter {name!r} is already being loaded", details={"adapter": name})
            future = self._loads[name] = Future()
            previous = self._entries.get(name)
        started = time.perf_counter()
        replaced = None
        try:
            try:
                adapter = self._loader.read_adapter(name, path, labels)
            except Exception as exc:
                error = self._as_service_error(name, path, exc)
                self._record_failure(name, path, previous, error)
                self._observe(error.code, None)
                raise error from None
            summary = summarize(path)
            with self._lock:
                entry = self._entries.get(name)
                replaced = entry.adapter if entry is not None else None
                if entry is None:
                    entry = self._entries[name] = AdapterEntry(name, AdapterState.READY, path, version=0)
                # In place: requests holding a lease on this name keep counting on the same entry.
                entry.path, entry.summary, entry.adapter, entry.state = path, summary, adapter, AdapterState.READY
                entry.labels_override = list(labels) if labels else None
                entry.error, entry.files_signature = None, ()
                entry.version += 1
                entry.served_pairs = 0
                entry.loads += 1
                self._host[name] = None
                self._host.move_to_end(name)
                evicted = self._evict_host()
            self._observe("ok", time.perf_counter() - started)
            if replaced is not None:
                evicted.append(replaced)
            for old in evicted:
                self._on_retire(old)
            logger.info("adapter %s %s from %s", name, "replaced" if previous else "loaded", path)
            return replace(entry)
        finally:
            with self._lock:
                self._loads.pop(name, None)
            future.cancel()

    def _record_failure(self, name: str, path: Path, previous: AdapterEntry | None, error: Exception) -> None:
        """An invalid adapter leaves a trace: a new name becomes FAILED with the reason; a refused
        replace keeps the old version serving and records why. Nothing at the path leaves no trace."""
        if not isinstance(error, AdapterInvalid):
            return
        with self._lock:
            if previous is not None and previous.state is not AdapterState.FAILED:
                previous.error = f"a replacement from {path} was refused: {error.message}"
            else:
                self._entries[name] = AdapterEntry(
                    name, AdapterState.FAILED, path, error=error.message, files_signature=files_signature(path)
                )

    def unload(self, name: str) -> AdapterEntry:
        with self._lock:
            if name in self._loads:
                raise AdapterConflict(f"adapter {name!r} is being loaded; retry", details={"adapter": name})
            entry = self._entries.pop(name, None)
            self._host.pop(name, None)
        if entry is None:
            raise self._not_found(name)
        if entry.adapter is not None:
            self._on_retire(entry.adapter)
        logger.info("adapter %s unloaded", name)
        return replace(entry, state=AdapterState.UNLOADED)

    def close(self) -> None:
        """Stop the loader pool (loads in progress finish; no new ones start)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- helpers ---------------------------------------------------------------------------------------
    def _not_found(self, name: str) -> AdapterNotFound:
        available = self.servable_names()
        return AdapterNotFound(
            f"no adapter named {name!r}; available: {', '.join(available[:20]) or 'none'}"
            + (f" and {len(available) - 20} more" if len(available) > 20 else ""),
            details={"adapter": name, "available": available[:100]},
        )

    @staticmethod
    def _as_service_error(name: str, path: Path, exc: Exception) -> AdapterNotFound | AdapterInvalid:
        kind = getattr(exc, "kind", None)
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        error = AdapterNotFound if kind == "not_found" else AdapterInvalid
        return error(message, details={"adapter": name, "path": str(path)})

    def _observe(self, outcome: str, seconds: float | None) -> None:
        if self._metrics is not None:
            self._metrics.observe_adapter_load(outcome, seconds)
