"""Prometheus metrics of one app instance: requests, latency, batches, queue, adapters, fraud scores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Counters and histograms get no `*_created` series: nobody graphs them and they double every family.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# The adapter label shared by every adapter past the first `max_adapters`. Adapter names start with a
# letter or digit (app.services.adapter_registry.NAME_PATTERN), so no adapter can be called this.
OTHER_ADAPTERS = "_other"
DEFAULT_MAX_ADAPTERS = 64  # Settings.metrics_max_adapters' default, for a Metrics built without settings


class QueueView(Protocol):
    """What the batcher reports (app.inference.batcher.QueueActivity)."""

    waiting_pairs: int
    running_pairs: int
    waiting_adapters: tuple[str, ...]
    running_adapters: tuple[str, ...]


class _StateCollector(Collector):
    """Values read from the live components at scrape time (queue, residency counters, tiers)."""

    def __init__(self) -> None:
        self.queue: Callable[[], QueueView] | None = None
        self.max_lora: int = 0  # device slots: adapters one batch may mix
        self.residency: Callable[[], tuple[int, int, int]] | None = None  # resident, moves in, evictions
        self.tiers: Callable[[], list[tuple[str, str]]] | None = None  # (adapter, tier) of every known adapter
        self.heap: Callable[[], tuple[int, int]] | None = None  # heap trims, bytes they gave back

    def collect(self) -> Iterable:
        if self.queue is not None:
            queue = self.queue()
            yield GaugeMetricFamily(
                "loraswap_queue_depth_pairs", "Pairs admitted and waiting (queued, or for their adapter to load).",
                queue.waiting_pairs,
            )
            yield GaugeMetricFamily("loraswap_running_pairs", "Pairs in the batches the engine is running.", queue.running_pairs)
            # The shape of vLLM's lora_requests_info, which the Gateway API Inference Extension's endpoint
            # picker reads for LoRA affinity; the value is the scrape time, as vLLM's is.
            info = GaugeMetricFamily(
                "loraswap_lora_requests_info",
                "Adapters of running and waiting requests, and how many one batch may mix.",
                labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            )
            info.add_metric(
                [",".join(queue.running_adapters), ",".join(queue.waiting_adapters), str(self.max_lora)], time.time()
            )
            yield info
        if self.residency is not None:
            resident, moves, evictions = self.residency()
            yield GaugeMetricFamily("loraswap_resident_adapters", "Adapters on the device now.", resident)
            yield CounterMetricFamily("loraswap_adapter_moves", "Adapters moved onto the device.", moves)
            yield CounterMetricFamily("loraswap_adapter_evictions", "Adapters evicted from the device.", evictions)
        if self.tiers is not None:
            placed = self.tiers()
            counts = GaugeMetricFamily(
                "loraswap_adapters", "Known adapters by the fastest tier holding them.", labels=["tier"]
            )
            for tier in ("disk", "host", "device"):
                counts.add_metric([tier], sum(t == tier for _, t in placed))
            yield counts
            # Only adapters held in memory: bounded by the host tier's size, never by the number on disk.
            held = GaugeMetricFamily(
                "loraswap_adapter_held", "1 for each adapter held in host memory or on the device.", labels=["adapter", "tier"]
            )
            for name, tier in placed:
                if tier != "disk":
                    held.add_metric([name, tier], 1)
            yield held
        if self.heap is not None:
            trims, released = self.heap()
            yield CounterMetricFamily(
                "loraswap_heap_trims", "Times the batch worker returned malloc's free pages to the system.", trims
            )
            yield CounterMetricFamily("loraswap_heap_trimmed_bytes", "Resident bytes those returns gave back.", released)


class AdapterLabels:
    """The `adapter` label of the per-adapter NLI series, bounded so that thousands of adapters on disk
    never mean thousands of series: the first `limit` distinct adapters counted get a place (a label of
    their own), every other one `OTHER_ADAPTERS`. `forget` (a DELETE) removes an adapter's series and frees
    its place for the next adapter counted that has none. Nothing is kept of adapters without a place, so
    that memory stays bounded too.

    Invariants: at most `limit` adapters hold a place; `_outcomes[name]` is every outcome `name`'s own
    series were counted with, which is what `forget` removes. Series are updated under the same lock as the
    places, so no series outlives its place. A request still running when its adapter is deleted is
    counted after the `forget`, and so takes a place again if one is free. Safe to call from any thread."""

    def __init__(self, limit: int, pairs: Counter, latency: Histogram):
        self.limit = limit
        self._pairs = pairs  # loraswap_nli_pairs{adapter,outcome}
        self._latency = latency  # loraswap_nli_request_seconds{adapter}
        self._lock = threading.Lock()
        self._outcomes: dict[str, set[str]] = {}

    def observe(self, pairs_by_adapter: Mapping[str, int], outcome: str, elapsed_s: float | None) -> None:
        """Count one request's pairs per adapter, and its latency once per adapter when it was answered
        (also under `OTHER_ADAPTERS`: its histogram is the sum of those the adapters would have had)."""
        with self._lock:
            for name, count in pairs_by_adapter.items():
                label = self._label(name, outcome)
                self._pairs.labels(label, outcome).inc(count)
                if elapsed_s is not None:
                    self._latency.labels(label).observe(elapsed_s)

    def _label(self, name: str, outcome: str) -> str:
        outcomes = self._outcomes.get(name)
        if outcomes is None:
            if len(self._outcomes) >= self.limit:
                return OTHER_ADAPTERS
            outcomes = self._outcomes[name] = set()
        outcomes.add(outcome)
        return name

    def forget(self, name: str) -> None:
        """Remove `name`'s own series and free its place for the next new adapter; its pairs counted so far
        leave the scrape with it (a counter that disappears is a reset to Prometheus)."""
        with self._lock:
            outcomes = self._outcomes.pop(name, None)
            if outcomes is None:  # counted under OTHER_ADAPTERS, or never: nothing of its own to remove
                return
            for outcome in outcomes:
                self._pairs.remove(name, outcome)
            self._latency.remove(name)  # absent when it was never answered: remove() ignores that

    def own(self) -> list[str]:
        """The adapters with series of their own, in the order they got them."""
        with self._lock:
            return list(self._outcomes)


class Metrics:
    """One registry per app, so several apps in one process (tests) never share counters. `max_adapters`:
    how many adapters get per-adapter NLI series of their own (LORASWAP_METRICS_MAX_ADAPTERS)."""

    def __init__(self, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        self.registry = CollectorRegistry()
        self.state = _StateCollector()
        self.registry.register(self.state)
        # process_resident_memory_bytes and friends: memory is what the adapter tiers are about.
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "loraswap_http_requests", "HTTP requests by route and status.", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraswap_http_request_seconds", "HTTP request latency by route.", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.adapter_pairs = Counter(
            "loraswap_nli_pairs", "NLI pairs answered, by adapter and outcome.", ["adapter", "outcome"],
            registry=self.registry,
        )
        self.adapter_latency = Histogram(
            "loraswap_nli_request_seconds", "NLI request latency by adapter (a batch request counts per adapter).",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        # The only way to count into the two families above: it keeps their adapter label bounded.
        self.adapter_labels = AdapterLabels(max_adapters, self.adapter_pairs, self.adapter_latency)
        self.batch_size = Histogram(
            "loraswap_batch_size_pairs", "Pairs per forward pass.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_wait = Histogram(
            "loraswap_queue_wait_seconds", "Time a pair waited in the queue before its forward pass.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.failed_batches = Counter(
            "loraswap_failed_batches", "Forward passes that raised.", registry=self.registry
        )
        self.adapter_loads = Counter(
            "loraswap_adapter_loads",
            "Adapter loads from disk into host memory (start-up, first use, PUT), by outcome.", ["outcome"],
            registry=self.registry,
        )
        self.adapter_load_seconds = Histogram(
            "loraswap_adapter_load_seconds", "Time to read and validate an adapter.", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fraud_scored = Counter(
            "loraswap_fraud_transactions", "Transactions scored, by decision.", ["decision"], registry=self.registry
        )

        self.host_evictions = Counter(
            "loraswap_adapter_host_evictions", "Adapters whose weights were dropped from host memory (LRU).",
            registry=self.registry,
        )
        self.management_refused = Counter(
            "loraswap_adapter_management_refused", "Adapter management calls refused before any work, by code.",
            ["code"], registry=self.registry,
        )

    # -- live values read at scrape time ---------------------------------------------------------------
    def watch_queue(self, activity: Callable[[], QueueView], max_lora: int) -> None:
        self.state.queue, self.state.max_lora = activity, max_lora

    def watch_residency(self, counters: Callable[[], tuple[int, int, int]]) -> None:
        self.state.residency = counters

    def watch_tiers(self, placed: Callable[[], list[tuple[str, str]]]) -> None:
        self.state.tiers = placed

    def watch_heap(self, counters: Callable[[], tuple[int, int]] | None) -> None:
        self.state.heap = counters

    # -- observers (any thread; prometheus_client is thread-safe) --------------------------------------
    def observe_adapter_load(self, outcome: str, seconds: float | None) -> None:
        self.adapter_loads.labels(outcome).inc()
        if seconds is not None:
            self.adapter_load_seconds.observe(seconds)

    def observe_host_eviction(self) -> None:
        self.host_evictions.inc()

    def observe_management_refused(self, code: str) -> None:
        self.management_refused.labels(code).inc()

    # The batcher's observer interface (called from its worker thread).
    def observe_batch(self, size: int, queue_waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def observe_failed_batch(self) -> None:
        self.failed_batches.inc()
