"""Ray Serve composition root: an ingress deployment serving the single server's FastAPI app (same
routes, bodies, errors, /docs) and an engine deployment whose replicas each run their own Runtime —
built by app.runtime.build_runtime, exactly as the single server builds it, mixed-adapter batching
included. Requests reach replicas by adapter: through Ray's model multiplexing with the adapter name as
model id (`routing="multiplex"`), or through app.serving.adapter_router's request router
(`routing="affinity"`); benchmarks/ray_fleet.py measures both, docs/scaling.md has the numbers.

`build_app(settings, ...)` returns the Ray application; `app_builder(args)` is the `import_path` target
of deploy/ray/serve.yaml."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve

from app.config import Settings
from app.errors import AdapterConflict, AdapterNotFound, NotReady, ServiceError
from app.runtime import Runtime, build_runtime
from app.serving.engine_client import (
    EngineClient,
    EngineReply,
    FleetProbe,
    RemoteAdapterService,
    RemoteNLIService,
    ReplicaHeaderMiddleware,
)
from app.serving.adapter_router import HELD_STAT, AdapterAffinityRouter
from app.serving.fleet_metrics import FleetMetrics
from app.serving.versions import AdapterChange, AdapterVersions, AppliedVersions
from app.services.nli import PairInput

logger = logging.getLogger(__name__)

APP_NAME = "loraswap"
ENGINE_DEPLOYMENT = "LoraswapEngine"
INGRESS_DEPLOYMENT = "LoraswapIngress"
# Adapters a replica reports as held to Ray's router (its multiplexing LRU): the default device slots.
HELD_ADAPTERS_PER_REPLICA = 16
ROUTINGS = ("multiplex", "affinity")
# The default routing, chosen by benchmarks/ray_fleet.py's side-by-side run (docs/scaling.md).
DEFAULT_ROUTING = "multiplex"
# How long catching up waits for a load of the same name already running in the replica's registry (a
# first request's load of the older version) before the request gets 503 and the change stays pending.
CATCH_UP_CONFLICT_WAIT_S = 30.0


class _HeldAdapter:
    """A replica's token for one adapter in Ray's multiplexing LRU (what its router routes by)."""

    def __init__(self, name: str):
        self.name = name


@serve.deployment(
    name=ENGINE_DEPLOYMENT,
    max_ongoing_requests=64,
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class EngineDeployment:
    """One engine replica: a Runtime (base, registry, batcher, NLI service) of its own. Requests for
    different adapters share its batches; adapter changes stamped by the ingress are applied in version
    order before anything else is answered."""

    def __init__(self, settings: dict[str, Any]):
        import ray

        self.settings = Settings(**{**settings, "fraud_enabled": False})
        self.runtime: Runtime = build_runtime(self.settings)
        self.name = ray.get_runtime_context().get_actor_name() or "engine"
        self.replica_id = serve.get_replica_context().replica_tag  # the `replica` label of its metrics
        self._applied = AppliedVersions()
        self._change_lock = asyncio.Lock()

    def check_health(self) -> None:
        # A replica whose base failed to load is replaced by Ray; the ingress answers 503 meanwhile.
        if self.runtime.nli_service is None:
            raise RuntimeError("the NLI base model is not loaded")

    @serve.multiplexed(max_num_models_per_replica=HELD_ADAPTERS_PER_REPLICA)
    async def _hold(self, name: str) -> _HeldAdapter:
        # The adapter itself is loaded by the registry (host tier) and residency (device tier): Ray's
        # LRU only tells its router which replica already holds which adapter.
        return _HeldAdapter(name)

    async def classify(
        self, pairs: list[PairInput], batch_field: str, wanted: dict[str, AdapterChange]
    ) -> EngineReply:
        try:
            await self._catch_up(wanted)
        except ServiceError as exc:
            return EngineReply(self.name, error=exc)
        names = {p.adapter or self.settings.default_adapter for p in pairs} - {None}
        held = self._resident(names)  # affinity, measured: no adapter of this request had to be loaded
        # Tell Ray's router this replica holds the adapter — also for a request sent without a model id
        # (a hot adapter spilling over), so later requests for it may come to either replica.
        # Held only once served: an unknown name never takes a place in Ray's LRU.
        model_id = serve.get_multiplexed_model_id() or (next(iter(names)) if len(names) == 1 else "")
        assert self.runtime.nli_service is not None
        try:
            results = await self.runtime.nli_service.classify(pairs, batch_field=batch_field)
        except ServiceError as exc:
            return EngineReply(self.name, error=exc, held=held)
        if model_id:
            await self._hold(model_id)
        return EngineReply(self.name, results=results, held=held)

    def record_routing_stats(self) -> dict[str, Any]:
        """What the affinity router routes by (Ray calls it every `request_routing_stats_period_s`):
        the adapters on this replica's device now."""
        registry = self.runtime.registry
        if registry is None:
            return {HELD_STAT: []}
        return {HELD_STAT: [e.name for e in registry.entries() if registry.tier(e) == "device"]}

    def metrics_text(self) -> tuple[str, str]:
        """This replica's Prometheus text (batches, queue, adapter tiers, ...), for the ingress's
        /metrics, which gathers every replica's by broadcast (app.serving.fleet_metrics)."""
        return self.replica_id, generate_latest(self.runtime.metrics.registry).decode()

    def _resident(self, names: set[str]) -> bool:
        service = self.runtime.adapter_service
        if service is None:
            return False
        try:
            return all(service.describe(name).resident for name in names)
        except ServiceError:  # unknown: the request gets its 404 from the NLI service
            return False

    async def change(self, name: str, change: AdapterChange, wanted: dict[str, AdapterChange]) -> EngineReply:
        """Apply one PUT or DELETE here first (its errors are the client's answer)."""
        try:
            await self._catch_up(wanted)
        except ServiceError as exc:
            return EngineReply(self.name, error=exc)
        return await asyncio.shield(self._spawn(self._change_now(name, change)))

    async def _change_now(self, name: str, change: AdapterChange) -> EngineReply:
        async with self._change_lock:
            try:
                info = await self._apply(name, change)
            except ServiceError as exc:
                return EngineReply(self.name, error=exc)
            self._applied.applied(name, change.version)
        return EngineReply(self.name, info=info)

    async def probe(self, wanted: dict[str, AdapterChange]) -> EngineReply:
        try:
            await self._catch_up(wanted)
        except ServiceError as exc:
            return EngineReply(self.name, error=exc)
        runtime = self.runtime
        reasons = [s.reason for s in runtime.readiness.snapshot() if not s.ready]
        base = None
        if runtime.engine is not None:
            engine = runtime.engine
            base = {
                "model_type": engine.config.model_type,
                "fingerprint": engine.fingerprint,
                "dtype": str(engine.dtype).removeprefix("torch."),
                "device": str(engine.device),
            }
        adapters = runtime.adapter_service.describe_all() if runtime.adapter_service is not None else None
        return EngineReply(self.name, adapters=adapters, base=base, not_ready="; ".join(r or "" for r in reasons) or None)

    async def _catch_up(self, wanted: dict[str, AdapterChange]) -> None:
        """Apply every change this replica is behind on before it answers; NotReady (503) if one cannot
        be applied yet. The changes run in a task of their own: a caller cancelled meanwhile (its caller
        timed out — the ingress's 5 s fleet probe does on a loaded machine) stops waiting, but the load
        runs to its end under the change lock and is recorded. Cancelling the load's await itself would
        abandon the registry's loader thread and free the lock with that load still running; the next
        catch-up then met 409 from the registry, and a 409 was taken as applied."""
        if self._applied.behind(wanted):
            await asyncio.shield(self._spawn(self._apply_behind(wanted)))

    async def _apply_behind(self, wanted: dict[str, AdapterChange]) -> None:
        async with self._change_lock:
            for name, change in self._applied.behind(wanted):
                try:
                    await self._apply_when_free(name, change)
                except AdapterConflict:  # a load of this name still runs here: stay behind, retry later
                    raise NotReady(
                        f"replica {self.name} is still applying version {change.version} of adapter {name!r}",
                        retry_after_s=1,
                    ) from None
                except ServiceError as exc:
                    # Refused for good here (files changed since the PUT, a DELETE of a name never held):
                    # no older version may go on answering under the new stamp.
                    logger.error("replica %s could not apply version %d of %s: %s", self.name, change.version, name, exc)
                    if not change.deleted:
                        await self._drop(name)
                self._applied.applied(name, change.version)

    async def _apply_when_free(self, name: str, change: AdapterChange, wait_s: float = CATCH_UP_CONFLICT_WAIT_S):
        """`_apply`, waiting (bounded) while the registry is loading the same name (409)."""
        deadline, pause = time.monotonic() + wait_s, 0.02
        while True:
            try:
                return await self._apply(name, change)
            except AdapterConflict:
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)  # polls the registry's single-flight load, bounded by the deadline
            pause = min(0.5, pause * 2)

    async def _drop(self, name: str) -> None:
        try:
            await self._apply(name, AdapterChange(0, None))
        except ServiceError:  # not held here, or still loading: nothing older serves under this name
            pass

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        task.add_done_callback(_consume_outcome)  # a caller that stopped waiting leaves no stray warning
        return task

    async def _apply(self, name: str, change: AdapterChange):
        service = self.runtime.adapter_service
        if service is None:
            raise AdapterNotFound("the NLI base model is not loaded")
        if change.deleted:
            return await service.unload(name)
        return await service.load(name, change.path or "", list(change.labels) if change.labels else None)

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)  # absent when __init__ failed
        if runtime is not None:
            runtime.close()


def _consume_outcome(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def build_ingress_app(settings: Settings, engine: Any, options: dict[str, Any]):
    """The single server's FastAPI app (create_app), with a lifespan that builds the ingress's Runtime
    through build_runtime — fraud scoring here, NLI and adapters forwarded to the engine replicas."""
    from app.main import create_app

    app = create_app(settings)
    app.router.lifespan_context = partial(_ingress_lifespan, engine=engine, options=options)
    app.add_middleware(ReplicaHeaderMiddleware)
    # /metrics: the single server's route serves one registry; here the fleet's, merged. Ours goes
    # first, so it matches before the included metrics router (which still documents it in /docs).
    app.add_api_route("/metrics", _fleet_metrics, methods=["GET"], response_class=Response, include_in_schema=False)
    app.router.routes.insert(0, app.router.routes.pop())
    return app


async def _fleet_metrics(request: Request) -> Response:
    fleet: FleetMetrics = request.app.state.fleet_metrics
    return Response(await fleet.render(), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def _ingress_lifespan(app: Any, *, engine: Any, options: dict[str, Any]) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    local = settings.model_copy(update={"nli_enabled": False})
    runtime = await anyio.to_thread.run_sync(partial(build_runtime, local, metrics=app.state.metrics))
    runtime.settings = settings
    client = EngineClient(engine, AdapterVersions(), timeout_s=float(options.get("engine_timeout_s", 60.0)))
    adapters = RemoteAdapterService(
        client, roots=settings.all_adapter_roots(), admin_token=settings.admin_token, metrics=app.state.metrics
    )
    runtime.nli_service = RemoteNLIService(  # type: ignore[assignment]
        client,
        default_adapter=settings.default_adapter,
        max_pairs_per_request=settings.max_pairs_per_request,
        split_mixed_batches=bool(options.get("split_mixed_batches", False)),
        # Under the affinity router every request carries its adapter; the router itself spills a hot one.
        spread_inflight=int(options.get("spread_inflight", 8)) if options.get("routing") != "affinity" else sys.maxsize,
    )
    runtime.adapter_service = adapters
    runtime.readiness.set_check("nli", client.health.readiness_reason)
    probe = FleetProbe(client, adapters, period_s=float(options.get("probe_period_s", 1.0)))
    await probe.probe_once()
    runtime.engine = probe.base  # type: ignore[assignment]  # what /info reports about the base
    app.state.runtime = runtime
    app.state.fleet_client = client
    app.state.fleet_metrics = FleetMetrics(
        engine, app.state.metrics.registry, timeout_s=float(options.get("metrics_timeout_s", 2.0))
    )

    def show_base() -> None:
        runtime.engine = probe.base  # type: ignore[assignment]

    task = asyncio.create_task(probe.run(show_base))
    try:
        yield
    finally:
        task.cancel()
        await anyio.to_thread.run_sync(runtime.close)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=512, graceful_shutdown_timeout_s=30)
@serve.ingress()
class IngressDeployment:
    """The HTTP entry point: the same API as `loraswap-serve`. One replica holds the adapter version
    stamps (see docs/scaling.md)."""

    def __init__(self, engine: Any, settings: dict[str, Any], options: dict[str, Any]):
        self._engine = engine
        self._settings = Settings(**settings)
        self._options = options

    def __serve_build_asgi_app__(self):
        self._app = build_ingress_app(self._settings, self._engine, self._options)
        return self._app

    def set_split_mixed_batches(self, split: bool) -> None:
        """Switch how a mixed `/nli/batch` is sent (benchmarks/ray_fleet.py measures both)."""
        self._app.state.runtime.nli_service.split_mixed_batches = split

    def adapter_versions(self) -> dict[str, AdapterChange]:
        """The version stamps this ingress sends with every request (for operators and tests)."""
        client = getattr(self._app.state, "fleet_client", None)
        return client.versions.snapshot() if client is not None else {}


def build_app(
    settings: Settings,
    *,
    engine_replicas: int | None = 2,
    engine_num_cpus: float = 1.0,
    engine_num_gpus: float = 0.0,
    ingress_num_cpus: float = 0.5,
    autoscaling: dict[str, Any] | None = None,
    split_mixed_batches: bool = False,
    engine_timeout_s: float = 60.0,
    spread_inflight: int = 8,
    metrics_timeout_s: float = 2.0,
    routing: str = DEFAULT_ROUTING,
):
    """The Ray Serve application: ingress -> engine replicas (fixed `engine_replicas`, or `autoscaling`),
    routed by adapter through Ray's multiplexing or the affinity router (`routing`, one of ROUTINGS)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
    settings_json = settings.model_dump(mode="json")
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": engine_num_cpus, "num_gpus": engine_num_gpus},
    }
    if routing == "affinity":
        from ray.serve.config import RequestRouterConfig

        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"spill_queue_len": spread_inflight},
            request_routing_stats_period_s=1.0,  # how stale a replica's held-adapter report may be
            request_routing_stats_timeout_s=5.0,
        )
    if autoscaling:
        engine_options["autoscaling_config"] = autoscaling
        engine_options["num_replicas"] = "auto"
    else:
        engine_options["num_replicas"] = engine_replicas
    engine = EngineDeployment.options(**engine_options).bind(settings_json)
    options = {
        "split_mixed_batches": split_mixed_batches,
        "engine_timeout_s": engine_timeout_s,
        "spread_inflight": spread_inflight,
        "metrics_timeout_s": metrics_timeout_s,
        "routing": routing,
    }
    return IngressDeployment.options(ray_actor_options={"num_cpus": ingress_num_cpus}).bind(
        engine, settings_json, options
    )


def app_builder(args: dict[str, Any]):
    """`serve deploy deploy/ray/serve.yaml`: settings from LORASWAP_ variables (plus `settings` in
    args); replicas, CPUs, GPUs and autoscaling come from the deployments section of the YAML."""
    settings = Settings(**(args.get("settings") or {}))
    return build_app(
        settings,
        split_mixed_batches=bool(args.get("split_mixed_batches", False)),
        engine_timeout_s=float(args.get("engine_timeout_s", 60.0)),
        spread_inflight=int(args.get("spread_inflight", 8)),
        metrics_timeout_s=float(args.get("metrics_timeout_s", 2.0)),
        routing=str(args.get("routing", DEFAULT_ROUTING)),
    )

