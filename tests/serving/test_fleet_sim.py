"""benchmarks.fleet_sim's behaviour on small made-up costs (no timing): the cost fit, affinity keeping
adapters on the device, and policies that cannot differ on one replica not differing."""

from __future__ import annotations

import pytest

from benchmarks.fleet_sim import POLICIES, Costs, SimConfig, fit, simulate

COSTS = Costs(base_s=0.004, per_row_s=0.001, per_adapter_s=0.0005, disk_to_host_s=0.02, host_to_device_s=0.002)


def test_the_forward_cost_fit_recovers_a_linear_model():
    points = [(r, k, 0.003 + 0.002 * r + 0.0007 * k) for r in (1, 4, 8, 16, 32) for k in (1, 2, 4, 8) if k <= r]
    a, b, c = fit(points)
    assert a == pytest.approx(0.003) and b == pytest.approx(0.002) and c == pytest.approx(0.0007)


def _small(replicas: int) -> SimConfig:
    return SimConfig(replicas=replicas, adapters=400, requests_per_replica=400, device_slots=8, host_slots=32,
                     load_factor=0.5, seed=3)


def test_affinity_keeps_adapters_on_the_device_that_random_routing_scatters():
    results = {p: simulate(p, _small(8), COSTS) for p in POLICIES}
    assert results["affine"]["device_hit_rate"] > results["random"]["device_hit_rate"]
    assert results["p2c-affinity"]["device_hit_rate"] > results["random"]["device_hit_rate"]
    assert results["p2c-affinity"]["device_hit_rate"] > results["least-loaded"]["device_hit_rate"]
    for result in results.values():
        assert 0 <= result["device_hit_rate"] <= 1 and result["throughput_rps"] > 0
        assert result["p50_ms"] <= result["p99_ms"]


def test_on_one_replica_every_policy_is_the_same_schedule():
    results = [simulate(p, _small(1), COSTS) for p in POLICIES]
    assert all({k: v for k, v in r.items() if k != "policy"} == {k: v for k, v in results[0].items() if k != "policy"}
               for r in results)
