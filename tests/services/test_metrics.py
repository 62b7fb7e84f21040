"""Metrics alone: one registry per instance, the batcher's observer calls, and the state read from
live components at scrape time."""

from __future__ import annotations

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
    assert sample(metrics, "loraswap_batch_size_count") == 2
    assert sample(metrics, "loraswap_batch_size_sum") == 4
    assert sample(metrics, "loraswap_batch_size_bucket", {"le": "2.0"}) == 1
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
    metrics.state.queue_depth = lambda: depth[0]
    metrics.state.residency = lambda: residency[0]
    assert sample(metrics, "loraswap_queue_depth_pairs") == 0
    depth[0], residency[0] = 7, (2, 5, 3)
    assert sample(metrics, "loraswap_queue_depth_pairs") == 7
    assert sample(metrics, "loraswap_resident_adapters") == 2
    assert sample(metrics, "loraswap_adapter_moves_total") == 5
    assert sample(metrics, "loraswap_adapter_evictions_total") == 3

