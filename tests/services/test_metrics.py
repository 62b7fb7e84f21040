"""Metrics alone: one registry per instance, the batcher's observer calls, and the state read from
live components at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from app.services.metrics import Metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_two_instances_never_share_a_counter():
    first, second = Metrics(), Metrics()
    first.adapter_pairs.labels("alpha", "ok").inc(3)
    first.requests.labels("/nli", "POST", "200").inc()
    assert sample(first, "loraswap_nli_pairs_total", {"adapter": "alpha", "outcome": "ok"}) == 3
    assert sample(second, "loraswap_nli_pairs_total", {"adapter": "alpha", "outcome": "ok"}) is None
    assert sample(second, "loraswap_http_requests_total", {"route": "/nli", "method": "POST", "status": "200"}) is None


def test_observe_batch_records_its_size_and_each_pairs_queue_wait():
    metrics = Metrics()
    metrics.observe_batch(3, [0.001, 0.002, 0.02])
    metrics.observe_batch(1, [0.5])
    assert sample(metrics, "loraswap_batch_size_pairs_count") == 2
    assert sample(metrics, "loraswap_batch_size_pairs_sum") == 4
    assert sample(metrics, "loraswap_batch_size_pairs_bucket", {"le": "2.0"}) == 1
    assert sample(metrics, "loraswap_queue_wait_seconds_count") == 4
    assert sample(metrics, "loraswap_queue_wait_seconds_bucket", {"le": "0.01"}) == 2


def test_observe_failed_batch_counts_forward_passes_that_raised():
    metrics = Metrics()
    assert sample(metrics, "loraswap_failed_batches_total") == 0
    metrics.observe_failed_batch()
    metrics.observe_failed_batch()
    assert sample(metrics, "loraswap_failed_batches_total") == 2


def test_live_state_is_absent_until_wired_then_read_at_each_scrape():
    metrics = Metrics()
    assert sample(metrics, "loraswap_queue_depth_pairs") is None
    assert sample(metrics, "loraswap_resident_adapters") is None
    depth = [0]
    residency = [(1, 1, 0)]
    metrics.watch_queue(lambda: Queue(depth[0], 0, (), ()), max_lora=16)
    metrics.watch_residency(lambda: residency[0])
    assert sample(metrics, "loraswap_queue_depth_pairs") == 0
    depth[0], residency[0] = 7, (2, 5, 3)
    assert sample(metrics, "loraswap_queue_depth_pairs") == 7
    assert sample(metrics, "loraswap_resident_adapters") == 2
    assert sample(metrics, "loraswap_adapter_moves_total") == 5
    assert sample(metrics, "loraswap_adapter_evictions_total") == 3




@dataclass(frozen=True)
class Queue:
    waiting_pairs: int
    running_pairs: int
    waiting_adapters: tuple[str, ...]
    running_adapters: tuple[str, ...]


def test_router_metrics_name_running_and_waiting_adapters_and_held_ones():
    """The endpoint picker's view: queued and running gauges, lora_requests_info, adapters held by tier."""
    metrics = Metrics()
    metrics.watch_queue(lambda: Queue(5, 3, ("c", "d"), ("a", "b")), max_lora=14)
    metrics.watch_tiers(lambda: [("a", "device"), ("b", "host"), ("c", "disk"), ("d", "disk")])
    assert sample(metrics, "loraswap_queue_depth_pairs") == 5
    assert sample(metrics, "loraswap_running_pairs") == 3
    labels = {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c,d", "max_lora": "14"}
    assert sample(metrics, "loraswap_lora_requests_info", labels) > 0  # the scrape time, as vLLM's
    assert sample(metrics, "loraswap_adapters", {"tier": "disk"}) == 2
    assert sample(metrics, "loraswap_adapter_held", {"adapter": "a", "tier": "device"}) == 1
    assert sample(metrics, "loraswap_adapter_held", {"adapter": "c", "tier": "disk"}) is None  # disk: not held


def test_no_created_series_and_process_memory_is_exported():
    metrics = Metrics()
    metrics.observe_batch(2, [0.001])
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert not any(name.endswith("_created") for name in names)
    assert sample(metrics, "process_resident_memory_bytes") > 0
