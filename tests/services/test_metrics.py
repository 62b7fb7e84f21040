"""Metrics alone: one registry per instance, the batcher's observer calls, the state read from live
components at scrape time, and the bounded adapter label of the per-adapter NLI series."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from app.config import Settings
from app.errors import InvalidInput
from app.services.adapter_registry import check_name
from app.services.metrics import OTHER_ADAPTERS, Metrics


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


# -- the bounded adapter label ------------------------------------------------------------------------------
def pairs(metrics: Metrics, adapter: str, outcome: str = "ok") -> float | None:
    return sample(metrics, "loraswap_nli_pairs_total", {"adapter": adapter, "outcome": outcome})


def latency_count(metrics: Metrics, adapter: str) -> float | None:
    return sample(metrics, "loraswap_nli_request_seconds_count", {"adapter": adapter})


def all_pairs(metrics: Metrics) -> float:
    return sum(
        s.value for family in metrics.registry.collect() for s in family.samples if s.name == "loraswap_nli_pairs_total"
    )


def adapter_labels_in_scrape(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.split('adapter="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(("loraswap_nli_pairs_total{", "loraswap_nli_request_seconds")) and 'adapter="' in line
    }


def test_the_first_adapters_get_their_own_series_and_the_rest_share_other():
    metrics = Metrics(max_adapters=2)
    labels = metrics.adapter_labels
    labels.observe({"a": 2}, "ok", 0.01)
    labels.observe({"b": 1, "c": 4}, "ok", 0.02)  # one request mixing b and c: c is the third adapter
    labels.observe({"d": 1, "a": 3}, "overloaded", None)  # refused: counted, no latency
    labels.observe({"c": 5}, "ok", 0.03)
    assert labels.own() == ["a", "b"]
    assert (pairs(metrics, "a"), pairs(metrics, "a", "overloaded"), pairs(metrics, "b")) == (2, 3, 1)
    assert pairs(metrics, "c") is None and pairs(metrics, "d", "overloaded") is None
    assert pairs(metrics, OTHER_ADAPTERS) == 9 and pairs(metrics, OTHER_ADAPTERS, "overloaded") == 1
    assert all_pairs(metrics) == 2 + 1 + 4 + 1 + 3 + 5  # every pair counted exactly once
    # Latency once per adapter and answered request: c's two requests under _other.
    assert [latency_count(metrics, name) for name in ("a", "b", OTHER_ADAPTERS)] == [1, 1, 2]
    assert adapter_labels_in_scrape(metrics) == {"a", "b", OTHER_ADAPTERS}


def test_many_adapters_leave_the_series_bounded():
    metrics = Metrics(max_adapters=3)
    for i in range(500):
        metrics.adapter_labels.observe({f"adapter-{i}": 1}, "ok", 0.001)
    assert adapter_labels_in_scrape(metrics) == {"adapter-0", "adapter-1", "adapter-2", OTHER_ADAPTERS}
    assert pairs(metrics, OTHER_ADAPTERS) == 497 and all_pairs(metrics) == 500


def test_forget_removes_every_series_of_the_adapter_and_frees_its_place():
    metrics = Metrics(max_adapters=2)
    labels = metrics.adapter_labels
    labels.observe({"a": 2}, "ok", 0.01)
    labels.observe({"a": 1}, "inference_failed", None)
    labels.observe({"b": 1}, "ok", 0.01)
    labels.observe({"c": 4}, "ok", 0.01)  # no place left: _other
    labels.forget("a")
    assert pairs(metrics, "a") is None and pairs(metrics, "a", "inference_failed") is None
    assert latency_count(metrics, "a") is None
    assert sample(metrics, "loraswap_nli_request_seconds_bucket", {"adapter": "a", "le": "+Inf"}) is None
    assert adapter_labels_in_scrape(metrics) == {"b", OTHER_ADAPTERS}
    assert labels.own() == ["b"]
    # The freed place goes to the next adapter counted that has none, c too: its earlier pairs stay in _other.
    labels.observe({"c": 1, "d": 1}, "ok", 0.01)
    assert labels.own() == ["b", "c"]
    assert (pairs(metrics, "c"), pairs(metrics, "d"), pairs(metrics, OTHER_ADAPTERS)) == (1, None, 5)


def test_forgetting_an_adapter_without_a_place_leaves_other_alone():
    metrics = Metrics(max_adapters=1)
    labels = metrics.adapter_labels
    labels.observe({"a": 1, "b": 2}, "ok", 0.01)
    labels.forget("b")  # counted under _other
    labels.forget("never-served")
    assert pairs(metrics, OTHER_ADAPTERS) == 2 and latency_count(metrics, OTHER_ADAPTERS) == 1
    assert labels.own() == ["a"] and pairs(metrics, "a") == 1
    labels.observe({"b": 1}, "ok", 0.01)  # a still holds the only place
    assert pairs(metrics, OTHER_ADAPTERS) == 3


def test_zero_places_count_every_adapter_as_other():
    metrics = Metrics(max_adapters=0)
    metrics.adapter_labels.observe({"a": 1, "b": 2}, "ok", 0.01)
    metrics.adapter_labels.observe({"a": 1}, "overloaded", None)
    assert metrics.adapter_labels.own() == []
    assert adapter_labels_in_scrape(metrics) == {OTHER_ADAPTERS}
    assert pairs(metrics, OTHER_ADAPTERS) == 3 and pairs(metrics, OTHER_ADAPTERS, "overloaded") == 1


def test_other_can_never_be_an_adapter_name():
    with pytest.raises(InvalidInput):
        check_name(OTHER_ADAPTERS)


def test_the_default_number_of_places_is_the_settings_default_and_never_negative():
    assert Metrics().adapter_labels.limit == Settings.model_fields["metrics_max_adapters"].default == 64
    assert Settings(metrics_max_adapters=0).metrics_max_adapters == 0
    with pytest.raises(ValidationError):
        Settings(metrics_max_adapters=-1)
