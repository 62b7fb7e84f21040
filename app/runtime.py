"""The one assembly of the serving pieces, without FastAPI: `build_runtime(settings)` connects engine,
registry, batcher, services, readiness and metrics, and `Runtime.close()` takes them down. The FastAPI
lifespan and the Ray Serve deployments both build through it, so they cannot drift apart."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.config import Settings
from app.errors import ServiceError
from app.services.fraud import FraudService
from app.services.metrics import Metrics
from app.services.readiness import Readiness

if TYPE_CHECKING:  # the heavy pieces are imported only when NLI is enabled
    from app.inference.batcher import Batcher
    from app.inference.engine import NLIEngine
    from app.services.adapter_registry import AdapterRegistry
    from app.services.adapters import AdapterService
    from app.services.nli import NLIService

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a server process serves with. `nli` and `fraud` parts are None when disabled (or,
    for NLI, when the base failed to load: readiness then says why)."""

    settings: Settings
    metrics: Metrics
    readiness: Readiness
    fraud_service: FraudService | None = None
    engine: NLIEngine | None = None
    registry: AdapterRegistry | None = None
    batcher: Batcher | None = None
    nli_service: NLIService | None = None
    adapter_service: AdapterService | None = None
    _closed: bool = field(default=False, repr=False)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking work and answer what is queued, then stop the workers. Blocking; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.batcher is not None:
            self.batcher.stop(timeout_s)
        if self.registry is not None:
            self.registry.close()


def build_runtime(settings: Settings, *, metrics: Metrics | None = None) -> Runtime:
    """Load what `settings` enables. Never raises for a model that fails to load: the failure is
    recorded in readiness and that part answers 503, so the rest keeps serving."""
    metrics = metrics or Metrics(settings.metrics_max_adapters)
    expected = (["nli"] if settings.nli_enabled else []) + (["fraud"] if settings.fraud_enabled else [])
    runtime = Runtime(settings=settings, metrics=metrics, readiness=Readiness(expected))
    if settings.fraud_enabled:
        runtime.fraud_service = _build_fraud(settings, runtime.readiness, metrics)
    if settings.nli_enabled:
        _build_nli(settings, runtime)
    return runtime


def _build_fraud(settings: Settings, readiness: Readiness, metrics: Metrics) -> FraudService:
    # Imported here: sklearn and joblib load only when the fraud scorer is enabled.
    from app.inference.fraud_scorer import FraudModelError, FraudScorer

    try:
        scorer = FraudScorer.load(settings.fraud_model_dir)
    except FraudModelError as exc:
        logger.error("fraud model not served: %s", exc)
        readiness.set_failed("fraud", str(exc))
        return FraudService(None, unavailable_reason=str(exc), metrics=metrics)
    readiness.set_ready("fraud")
    logger.info("fraud model %s loaded from %s", scorer.model_version, settings.fraud_model_dir)
    return FraudService(scorer, max_batch_transactions=settings.fraud_max_batch_transactions, metrics=metrics)


def batch_fill_ratio(settings: Settings, device_type: str) -> float:
    """The batching policy's one device-dependent choice: how full (real tokens / padded tokens) a
    batch must stay. On a CPU padding is paid in full, so a fuller batch beats a bigger one; on CUDA
    bigger batches pay off."""
    if settings.min_batch_fill_ratio is not None:
        return settings.min_batch_fill_ratio
    return 0.5 if device_type == "cuda" else 0.9


def _build_nli(settings: Settings, runtime: Runtime) -> None:
    # Imported here: torch and transformers load only when NLI is enabled.
    import torch

    from app.inference.base_model import BaseModelError, resolve_base
    from app.inference.batcher import Batcher
    from app.inference.engine import NLIEngine
    from app.inference.heap import HeapTrimmer
    from app.services.adapter_registry import AdapterRegistry
    from app.services.adapters import AdapterService
    from app.services.nli import NLIService

    metrics, readiness = runtime.metrics, runtime.readiness
    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        spec = resolve_base(settings.base_model, random_init=settings.base_random_init, seed=settings.base_random_seed)
        engine = NLIEngine(
            spec,
            device=settings.device,
            max_seq_len=settings.max_seq_len_tokens,
            max_resident=settings.max_resident_adapters,
            max_rank=settings.max_lora_rank,
            pinned=set(settings.pinned_adapters),
        )
    except (BaseModelError, OSError, RuntimeError) as exc:
        logger.error("NLI base %s not served: %s", settings.base_model, exc)
        readiness.set_failed("nli", f"base model {settings.base_model!r} failed to load: {exc}")
        return

    def retire(adapter) -> None:
        # Unloaded, replaced or evicted from the host: its slot is freed by the engine's worker.
        engine.slots.retire(adapter)
        if runtime.batcher is not None:
            runtime.batcher.request_maintenance()

    registry = AdapterRegistry(
        engine,
        engine.slots,
        max_host=settings.max_host_adapters,
        roots=settings.all_adapter_roots(),
        loader_threads=settings.adapter_loader_threads,
        metrics=metrics,
        on_retire=retire,
    )
    registry.discover(settings.adapters_dir)
    warm = _preload(registry, [*settings.pinned_adapters, settings.default_adapter])
    if warm is not None:
        # One forward before taking traffic: the first pays one-off costs (allocations, kernels).
        engine.run(engine.encode(["warm-up"], ["warm-up"]), [warm])
    batcher = Batcher(
        engine,
        max_batch_pairs=settings.max_batch_pairs,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_batch_wait_ms,
        max_queue_pairs=settings.max_queue_pairs,
        max_queue_wait_ms=settings.max_queue_wait_ms,
        min_fill=batch_fill_ratio(settings, engine.device.type),
        observer=metrics,
        heap=HeapTrimmer(settings.heap_trim_mb * 2**20),
    )
    batcher.start()
    metrics.watch_heap(batcher.heap.counters if batcher.heap.enabled else None)
    metrics.watch_queue(batcher.activity, max_lora=engine.slots.max_distinct_per_batch)
    metrics.watch_residency(engine.slots.counters)
    metrics.watch_tiers(lambda: [(entry.name, registry.tier(entry)) for entry in registry.entries()])
    runtime.engine, runtime.registry, runtime.batcher = engine, registry, batcher
    runtime.nli_service = NLIService(
        registry,
        batcher,
        default_adapter=settings.default_adapter,
        max_text_chars=settings.max_text_chars,
        max_pairs_per_request=settings.max_pairs_per_request,
        metrics=metrics,
    )
    runtime.adapter_service = AdapterService(
        registry, roots=settings.all_adapter_roots(), admin_token=settings.admin_token, metrics=metrics
    )
    readiness.set_check("nli", _nli_readiness(registry, batcher, settings.default_adapter))


def _preload(registry: AdapterRegistry, names: list[str | None]):
    """Load the pinned adapters and the default one before taking traffic (a broken one is recorded as
    failed, with its reason); returns the weights of the last that loaded, for the warm-up forward."""
    warm = None
    for name in dict.fromkeys(n for n in names if n):
        try:
            lease = registry.lease([name])
        except ServiceError as exc:
            logger.error("adapter %s not preloaded: %s", name, exc.message)
            continue
        try:
            warm = registry.load_now(lease)[name]
        except ServiceError as exc:
            logger.error("adapter %s not preloaded: %s", name, exc.message)
        finally:
            lease.release()
    return warm


def _nli_readiness(registry: AdapterRegistry, batcher: Batcher, default: str | None):
    """Ready while the batch worker runs and the default adapter can serve; with no default configured,
    as soon as the base is loaded (adapters then come and go by PUT and DELETE, and requests name theirs)."""

    def check() -> str | None:
        if not batcher.alive:
            return "the batch worker has stopped"
        if default is None:
            return None
        servable = registry.servable_names()
        if default in servable:
            return None
        return f"default adapter {default!r} cannot serve (servable: {', '.join(servable[:20]) or 'none'})"

    return check
