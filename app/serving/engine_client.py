"""The ingress's side of the engine fleet: calls to engine replicas (retried, bounded in time), fleet
health for readiness, and the NLI and adapter services the FastAPI routes use, forwarding to replicas.

No torch here: the ingress holds no model. Every call carries the adapter version stamps, so a replica
catches up on PUTs and DELETEs before it answers (see app.serving.versions)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.errors import AdapterConflict, AdapterNotFound, NotReady, ServiceError
from app.schemas.adapters import AdapterInfo
from app.serving.versions import AdapterChange, AdapterVersions
from app.services.adapters import AdapterService
from app.services.metrics import Metrics
from app.services.nli import Classification, PairInput

logger = logging.getLogger(__name__)

# Which replicas answered the current HTTP request, and whether each already held the adapter; filled
# by the services below, turned into response headers by `ReplicaHeaderMiddleware`.
served_by: contextvars.ContextVar[list[tuple[str, bool | None, str]] | None] = contextvars.ContextVar(
    "served_by", default=None
)


@dataclass
class EngineReply:
    """What an engine replica returns: a result or the typed error it raised (never an exception
    across Ray, so the ingress maps it exactly as the single server does)."""

    replica: str
    error: ServiceError | None = None
    results: list[Classification] | None = None
    info: AdapterInfo | None = None
    adapters: list[AdapterInfo] | None = None
    held: bool | None = None  # the replica already held the request's adapter (multiplexing affinity)
    base: dict[str, str] | None = None
    not_ready: str | None = None


@dataclass
class FleetHealth:
    """Whether any engine replica answered lately. `down_after_s` without an answer (and a failure
    since) means no replica is ready: requests then get 503 with Retry-After at once."""

    down_after_s: float = 10.0
    last_ok: float = field(default_factory=time.monotonic)
    last_failure: float = 0.0
    not_ready_reason: str | None = None  # what the last replica probed said is missing
    answered_once: bool = False

    def ok(self) -> None:
        self.last_ok = time.monotonic()
        self.answered_once = True

    def failed(self) -> None:
        self.last_failure = time.monotonic()

    def down(self) -> bool:
        return self.last_failure > self.last_ok and time.monotonic() - self.last_ok > self.down_after_s

    def readiness_reason(self) -> str | None:
        if not self.answered_once or self.down():
            return "no engine replica is ready"
        return self.not_ready_reason


class EngineClient:
    """Calls one method of the engine deployment. A replica that dies or cannot be reached mid-call is
    retried on another (calls are idempotent); after `attempts`, or past `timeout_s`, the caller gets
    503 NotReady with Retry-After — never a hang."""

    def __init__(self, handle: Any, versions: AdapterVersions, *, timeout_s: float, attempts: int = 3):
        self._handle = handle
        self.versions = versions
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.health = FleetHealth()

    async def call(self, method: str, *args: Any, model_id: str = "", timeout_s: float | None = None) -> EngineReply:
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        if self.health.down():
            raise NotReady("no engine replica is ready", retry_after_s=2)
        retriable = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError,
                     RequestCancelledError, asyncio.TimeoutError)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        for attempt in range(1, self.attempts + 1):
            response = self._handle.options(method_name=method, multiplexed_model_id=model_id).remote(
                *args, self.versions.snapshot()
            )
            try:
                reply: EngineReply = await asyncio.wait_for(_result(response), max(0.1, deadline - time.monotonic()))
            except retriable as exc:
                response.cancel()
                self.health.failed()
                logger.warning("engine call %s failed (attempt %d/%d): %r", method, attempt, self.attempts, exc)
                if time.monotonic() >= deadline:
                    break
                continue
            self.health.ok()
            return reply
        raise NotReady("no engine replica answered", retry_after_s=2)


async def _result(response: Any) -> Any:
    return await response


def _record(reply: EngineReply, model_id: str = "") -> None:
    seen = served_by.get()
    if seen is not None:
        seen.append((reply.replica, reply.held, model_id))


class RemoteNLIService:
    """The NLIService interface (`classify`) served by engine replicas. A request goes to a replica
    chosen by Ray's multiplexing with the adapter name as model id (affinity). A hot adapter spreads:
    once `spread_inflight` of its requests are in flight here, further ones go out without a model id,
    so Ray's power-of-two choices puts them on the less loaded of two replicas. A `/nli/batch` mixing
    adapters is sent whole (one replica, one mixed forward) unless `split_mixed_batches`, which sends
    one call per adapter and gathers them — docs/scaling.md has the measurement behind the default."""

    def __init__(
        self,
        client: EngineClient,
        *,
        default_adapter: str | None,
        max_pairs_per_request: int,
        split_mixed_batches: bool = False,
        spread_inflight: int = 8,
    ):
        self._client = client
        self.spread_inflight = max(1, spread_inflight)
        self._inflight: Counter[str] = Counter()
        self.default_adapter = default_adapter
        self.max_pairs_per_request = max_pairs_per_request
        self.split_mixed_batches = split_mixed_batches

    async def classify(self, pairs: list[PairInput], *, batch_field: str = "") -> list[Classification]:
        names = [p.adapter or self.default_adapter or "" for p in pairs]
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        if self.split_mixed_batches and len(groups) > 1 and len(pairs) <= self.max_pairs_per_request:
            split = await self._split(pairs, groups, batch_field)
            if split is not None:
                return split
        # Whole: the most frequent adapter decides the replica; the others ride in the same forward.
        model_id = Counter(names).most_common(1)[0][0] if names else ""
        return await self._one(pairs, batch_field, model_id)

    async def _split(
        self, pairs: list[PairInput], groups: dict[str, list[int]], batch_field: str
    ) -> list[Classification] | None:
        calls = [self._one([pairs[i] for i in idx], batch_field, name) for name, idx in groups.items()]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        if any(isinstance(o, BaseException) for o in outcomes):
            # An error names fields by their place in the whole request: let one whole call raise it.
            return None
        results: list[Classification | None] = [None] * len(pairs)
        for idx, group_results in zip(groups.values(), outcomes):
            for i, result in zip(idx, group_results):  # type: ignore[arg-type]
                results[i] = result
        return results  # type: ignore[return-value]

    def _model_id(self, adapter: str) -> str:
        return adapter if self._inflight[adapter] < self.spread_inflight else ""

    async def _one(self, pairs: list[PairInput], batch_field: str, adapter: str) -> list[Classification]:
        model_id = self._model_id(adapter) if adapter else ""
        self._inflight[adapter] += 1
        try:
            reply = await self._client.call("classify", pairs, batch_field, model_id=model_id)
        finally:
            self._inflight[adapter] -= 1
        _record(reply, model_id)
        if reply.error is not None:
            raise reply.error
        return reply.results or []


class RemoteAdapterService(AdapterService):
    """The AdapterService interface at the ingress: the same authorisation and path rules (inherited),
    changes applied on one replica, stamped with a version, and caught up by every other replica before
    it next answers. Listings come from the latest view a replica reported (refreshed every second by
    the readiness probe) with changes made here applied at once."""

    def __init__(
        self, client: EngineClient, *, roots: list[Path], admin_token: str | None, metrics: Metrics | None = None
    ):
        super().__init__(None, roots=roots, admin_token=admin_token, metrics=metrics)  # type: ignore[arg-type]
        self._client = client
        self._view: dict[str, AdapterInfo] = {}
        self._view_version = -1
        self._locks: dict[str, asyncio.Lock] = {}

    def update_view(self, adapters: list[AdapterInfo], as_of_version: int) -> None:
        """A replica's listing, taken after it applied every change up to `as_of_version`; an older
        listing than the one held (a probe that crossed a PUT) is ignored."""
        if as_of_version >= self._view_version:
            self._view = {a.name: a for a in adapters}
            self._view_version = as_of_version

    def describe(self, name: str) -> AdapterInfo:
        info = self._view.get(name)
        if info is None:
            available = self._ready_names()
            raise AdapterNotFound(
                f"no adapter named {name!r}; available: {', '.join(available) or 'none'}",
                details={"adapter": name, "available": available},
            )
        return info

    def describe_all(self) -> list[AdapterInfo]:
        return list(self._view.values())

    def _ready_names(self) -> list[str]:
        # Known on disk serves too (it loads on first use); only a failed adapter cannot.
        return sorted(a.name for a in self._view.values() if a.state != "failed")

    async def load(self, name: str, raw_path: str, labels: list[str] | None = None) -> AdapterInfo:
        path = self.resolve_path(raw_path)
        change = AdapterChange(0, str(path), tuple(labels) if labels else None)
        return await self._change(name, change)

    async def unload(self, name: str) -> AdapterInfo:
        return await self._change(name, AdapterChange(0, None))

    async def _change(self, name: str, change: AdapterChange) -> AdapterInfo:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise AdapterConflict(f"a change to adapter {name!r} is already in progress; retry")
        async with lock:
            versions = self._client.versions
            stamped = AdapterChange(versions.reserve(), change.path, change.labels)
            reply = await self._client.call("change", name, stamped)
            _record(reply)
            if reply.error is not None:
                raise reply.error
            versions.commit(name, stamped)
            assert reply.info is not None
            self._view[name] = reply.info
            self._view_version = stamped.version
            if stamped.deleted:
                self._view.pop(name, None)
            return reply.info


class FleetProbe:
    """Asks an engine replica every `period_s` for its readiness, base and adapter listing (and so
    also spreads adapter changes to replicas between requests). `base` is what /info reports."""

    def __init__(self, client: EngineClient, adapters: RemoteAdapterService, *, period_s: float = 1.0):
        self._client = client
        self._adapters = adapters
        self._period_s = period_s
        self.base: SimpleNamespace | None = None

    async def run(self, on_probe: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            await self.probe_once()
            on_probe()

    async def probe_once(self) -> None:
        as_of = self._client.versions.committed
        try:
            # Short: a fleet with no replica is noticed within seconds, and requests then get 503 at once.
            reply = await self._client.call("probe", model_id="", timeout_s=5.0)
        except ServiceError:
            return
        self._client.health.not_ready_reason = reply.not_ready
        if reply.adapters is not None:
            self._adapters.update_view(reply.adapters, as_of)
        if reply.base is not None:
            self.base = SimpleNamespace(
                config=SimpleNamespace(model_type=reply.base["model_type"]),
                fingerprint=reply.base["fingerprint"],
                dtype=reply.base["dtype"],
                device=reply.base["device"],
            )


class ReplicaHeaderMiddleware:
    """Adds `X-Loraswap-Replica` (the engine replicas that answered), `X-Loraswap-Adapter-Held` (`1`
    when each already held the request's adapter) and `X-Loraswap-Model-Id` (the multiplexing id each
    call went out under) to responses: how affinity and spreading are measured. The bodies stay
    exactly the single server's."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen: list[tuple[str, bool | None, str]] = []
        token = served_by.set(seen)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start" and seen:
                headers = list(message.get("headers", []))
                headers.append((b"x-loraswap-replica", ",".join(r for r, _, _ in seen).encode()))
                held = ",".join("" if h is None else str(int(h)) for _, h, _ in seen)
                headers.append((b"x-loraswap-adapter-held", held.encode()))
                headers.append((b"x-loraswap-model-id", ",".join(m for _, _, m in seen).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            served_by.reset(token)

