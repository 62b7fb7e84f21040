"""The adapters-at-scale benchmark's pieces on tiny inputs: the cached pool, the PEFT LRU baseline,
the tier probes, results.json and its report; one slow run of the whole thing on a handful of adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.artifacts import WEIGHTS_FILE, AdapterMetadata
from benchmarks import adapter_pool
from benchmarks.adapter_pool import MANIFEST_FILE, prepare_pool
from benchmarks.adapter_sets import AdapterSet
from benchmarks.adapters_at_scale import (
    RssSampler,
    Scenario,
    assemble_results,
    parse_adapter_metrics,
    parse_args,
    plan_scenarios,
    summarize_listing,
    tier_activity,
)
from benchmarks.baselines.naive_peft import NaiveConfig
from benchmarks.baselines.peft_lru import create_app
from benchmarks.loadgen import LoadResult
from benchmarks.scale_report import write_scale_report
from tests.benchmarks.test_baselines import peft_alone

PAIR = ("A man is playing a guitar on stage.", "A person plays music.")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_fingerprint(tiny_roberta_spec) -> str:
    from app.inference.base_model import build_classifier, fingerprint

    return fingerprint(build_classifier(tiny_roberta_spec, num_labels=3))


@pytest.fixture(scope="module")
def tiny_pool(tiny_roberta_spec, tiny_fingerprint, tmp_path_factory) -> AdapterSet:
    return prepare_pool(tiny_roberta_spec, 4, rank=4, base_fingerprint=tiny_fingerprint,
                        root=tmp_path_factory.mktemp("pool"))


def test_pool_holds_valid_distinct_adapters_of_its_rank(tiny_pool, tiny_fingerprint):
    assert tiny_pool.names == ["synth-0000", "synth-0001", "synth-0002", "synth-0003"]
    weights = []
    for name in tiny_pool.names:
        meta = AdapterMetadata.read(tiny_pool.path(name))
        assert (meta.name, meta.lora.r, meta.base.fingerprint) == (name, 4, tiny_fingerprint)
        assert meta.files == AdapterMetadata.checksums(tiny_pool.path(name), list(meta.files))
        weights.append(load_file(str(tiny_pool.path(name) / WEIGHTS_FILE)))
    assert weights[0].keys() == weights[1].keys()
    assert any(not weights[0][key].equal(weights[1][key]) for key in weights[0])
    manifest = json.loads((tiny_pool.root / MANIFEST_FILE).read_text())
    assert (manifest["count"], manifest["rank"], manifest["names"]) == (4, 4, tiny_pool.names)


def test_a_complete_pool_is_reused_and_an_incomplete_one_rebuilt(tiny_roberta_spec, tiny_fingerprint, tmp_path,
                                                                 monkeypatch):
    first = prepare_pool(tiny_roberta_spec, 2, rank=2, base_fingerprint=tiny_fingerprint, root=tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete pool was generated again")

    with monkeypatch.context() as patch:
        patch.setattr(adapter_pool, "write_synthetic", must_not_run)
        again = prepare_pool(tiny_roberta_spec, 2, rank=2, base_fingerprint=tiny_fingerprint, root=tmp_path)
    assert again == first

    (first.root / MANIFEST_FILE).unlink()  # as an interrupted build would leave it
    rebuilt = prepare_pool(tiny_roberta_spec, 2, rank=2, base_fingerprint=tiny_fingerprint, root=tmp_path)
    assert rebuilt.root == first.root and (rebuilt.root / MANIFEST_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.root.name]  # no scratch directory left


def test_peft_lru_server_loads_on_miss_evicts_lru_and_answers_like_peft_alone(tiny_roberta_dir, tiny_roberta_spec,
                                                                              tiny_pool):
    names = tiny_pool.names
    app = create_app(tiny_pool.root, names[0], max_loaded=2, config=NaiveConfig(base=str(tiny_roberta_dir)))
    premise, hypothesis = PAIR
    answers = {}
    with TestClient(app) as client:
        assert client.get("/stats").json()["loaded"] == [names[0]]
        for name in (names[0], names[1], names[2], names[0]):
            body = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": name}).json()
            assert body["adapter"] == name
            answers.setdefault(name, []).append(list(body["scores"].values()))
        stats = client.get("/stats").json()
        assert (stats["loads"], stats["hits"], stats["evictions"]) == (3, 1, 2)
        assert stats["loaded"] == [names[2], names[0]]
        for bad in ("synth-9999", "..", "a/b"):
            response = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": bad})
            assert response.status_code == 404
    assert answers[names[0]][0] == pytest.approx(answers[names[0]][1], abs=1e-6)  # evicted and loaded again
    for name in names[:3]:
        want = peft_alone(tiny_roberta_spec, tiny_pool.path(name), 3, premise, hypothesis)
        assert answers[name][0] == pytest.approx(want, abs=1e-5)


def metrics_page(moves: int, evictions: int, loads: int, fast_loads: int, load_s: float) -> str:
    """A /metrics page with the adapter counters of a tiered server (and one series that is not one)."""
    return "\n".join([
        "# TYPE loraswap_adapter_moves counter",
        f"loraswap_adapter_moves {moves}.0",
        f"loraswap_adapter_evictions {evictions}.0",
        f'loraswap_adapter_loads_total{{outcome="ok"}} {loads}.0',
        f'loraswap_adapter_load_seconds_bucket{{le="0.01"}} {fast_loads}.0',
        f"loraswap_adapter_load_seconds_count {loads}.0",
        f"loraswap_adapter_load_seconds_sum {load_s}",
        "loraswap_batch_size_pairs_count 4.0",
    ]) + "\n"


METRICS_BEFORE = metrics_page(moves=10, evictions=2, loads=3, fast_loads=3, load_s=0.03)
METRICS_AFTER = metrics_page(moves=50, evictions=30, loads=33, fast_loads=13, load_s=0.33)


def listing(tiers: list[str], loads: list[int]) -> list[dict]:
    return [
        {"name": f"a{i}", "state": "ready" if tier != "disk" else "known", "tier": tier, "pinned": i == 0,
         "loads": n, "host_evictions": max(0, n - 1), "requests": 5 * n}
        for i, (tier, n) in enumerate(zip(tiers, loads))
    ]


def loraswap_scenario(name: str = "loraswap-r16-zipf") -> Scenario:
    return Scenario(name, "loraswap", AdapterSet(Path("/nowhere"), ["a0", "a1"], "synthetic"), "zipf", 16)


def test_tier_activity_from_two_probes_of_a_tiered_server():
    before = {"listing": summarize_listing(listing(["device", "host", "disk"], [1, 1, 0])),
              "metrics": parse_adapter_metrics(METRICS_BEFORE), "batch_sizes": None}
    after = {"listing": summarize_listing(listing(["device", "disk", "host"], [1, 3, 27])),
             "metrics": parse_adapter_metrics(METRICS_AFTER), "batch_sizes": None}
    assert after["listing"]["tiers"] == {"disk": 1, "host": 1, "device": 1} and after["listing"]["pinned"] == 1
    activity = tier_activity(loraswap_scenario(), before, after, pairs=200)
    assert (activity["disk_loads"], activity["device_moves"]) == (29, 40)
    assert (activity["host_evictions"], activity["device_evictions"]) == (28, 28)
    assert activity["device_hit_rate"] == pytest.approx(1 - 40 / 200)
    assert activity["host_hit_rate"] == pytest.approx(1 - 29 / 40, abs=1e-4)
    assert activity["load_ms_mean"] == pytest.approx(10.0)
    assert activity["metrics_delta"] == {  # counters that moved; histogram buckets left out
        "loraswap_adapter_moves": 40.0, "loraswap_adapter_evictions": 28.0,
        'loraswap_adapter_loads_total{outcome="ok"}': 30.0, "loraswap_adapter_load_seconds_count": 30.0,
        "loraswap_adapter_load_seconds_sum": 0.3,
    }


def test_a_server_without_tiers_reads_as_host_and_device():
    adapters = [{"name": "a", "state": "ready", "resident": True}, {"name": "b", "state": "ready", "resident": False},
                {"name": "c", "state": "failed", "resident": False}]
    summary = summarize_listing(adapters)
    assert summary["tiers"] == {"disk": 1, "host": 1, "device": 1} and summary["loads"] == 0
    assert summary["states"] == {"ready": 2, "failed": 1}


def fake_measurement(system: str, pairs_s: float, *, rss_mb: int, loads: int = 0) -> dict:
    result = LoadResult(requests=20, ok=20, errors=0, errors_by_kind={}, duration_s=20 / pairs_s,
                        latencies_ms=[float(i) for i in range(1, 21)])
    activity = ({"loads": loads, "evictions": loads, "hit_rate": 0.5, "load_ms_mean": 25.0, "loaded_at_end": 25}
                if system == "peft_lru" else
                {"disk_loads": loads, "load_ms_mean": 5.0, "device_moves": loads, "host_evictions": 0, "device_evictions": 0,
                 "device_hit_rate": 0.5,
                 "host_hit_rate": 0.0, "tiers_at_end": {}, "states_at_end": {}, "metrics_delta": {},
                 "batch_sizes": None})
    return {**result.summary(), "warmup_errors": 0, "warmup_errors_by_kind": {}, "rounds_pairs_s": [pairs_s],
            "server_cpu_ms_per_pair": 10.0, "rss_peak_bytes": rss_mb * 2**20, "rss_end_bytes": rss_mb * 2**20,
            "tier_activity": activity}


def test_results_ratios_targets_and_report(tmp_path):
    args = parse_args(["--quick", "--count", "2", "--ranks", "16,64", "--out", str(tmp_path)])
    pools = {rank: AdapterSet(tmp_path, ["a0", "a1"], "synthetic") for rank in (16, 64)}
    few = AdapterSet(tmp_path, ["mnli", "snli", "rte"], "shipped")
    scenarios = plan_scenarios(args, few, pools)
    assert [s.name for s in scenarios] == [
        "few", "loraswap-r16-zipf", "peft_lru-r16-zipf", "loraswap-r16-uniform", "peft_lru-r16-uniform",
        "loraswap-r64-uniform", "peft_lru-r64-uniform",
    ]
    throughput = {"few": 40.0, "loraswap-r16-zipf": 36.0, "peft_lru-r16-zipf": 12.0, "loraswap-r16-uniform": 30.0,
                  "peft_lru-r16-uniform": 10.0, "loraswap-r64-uniform": 25.0, "peft_lru-r64-uniform": 4.0}
    rss = {"few": 500, "loraswap-r16-zipf": 540, "loraswap-r16-uniform": 600, "loraswap-r64-uniform": 600}
    measured = {s.name: fake_measurement(s.system, throughput[s.name], rss_mb=rss.get(s.name, 700), loads=5)
                for s in scenarios}
    file_mb = {16: 0.5, 64: 2.0}
    started = {s.name: {"adapter_file_bytes": int(file_mb.get(s.rank, 0.5) * 2**20), "ready_s": 3.0,
                        "rss_ready_bytes": 400 * 2**20, "at_ready": summarize_listing(listing(["disk"] * 2, [0, 0]))}
               for s in scenarios}
    results = assemble_results(args, scenarios, started, measured, pool_bytes={"r16": 1, "r64": 2},
                               description={"cpu": "test cpu", "cores": 2, "load_average_1_5_15": [0.1]},
                               wall_s=1.0, argv=["--quick"])
    results = json.loads(json.dumps(results))  # what lands in results.json
    assert results["ratio_vs_few"] == {"r16": 0.9}
    assert results["ratio_vs_peft_lru"] == {"r16-zipf": 3.0, "r16-uniform": 3.0, "r64-uniform": 6.25}
    met = {t["target"]: t["met"] for t in results["targets"]}
    assert met["r16 Zipf: 2 adapters / 3 adapters"] is True
    assert met["r16 uniform: loraswap / PEFT hot-swap LRU"] is False
    assert met["r64 uniform: loraswap / PEFT hot-swap LRU"] is True
    assert met["loraswap errors (all scenarios, warm-up included)"] is True
    # RSS budget: the few server's peak (500 MB) + 64 x file size x 1.3: 541.6 MB at r16, 666.4 MB at r64.
    assert met["loraswap-r16-zipf: peak RSS (MB)"] is True
    assert met["loraswap-r16-uniform: peak RSS (MB)"] is False
    assert met["loraswap-r64-uniform: peak RSS (MB)"] is True

    paths = write_scale_report(results, tmp_path)
    table = paths[0].read_text()
    assert all(s.name in table for s in scenarios) and "**no**" in table
    assert all(p.read_bytes()[:8] == PNG for p in paths[1:])


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path):
    """Real servers on the embedded base, a handful of adapters and requests: every scenario answers
    without errors and the report is written."""
    from benchmarks.adapters_at_scale import main

    results = main([
        "--count", "6", "--ranks", "4", "--requests", "12", "--warmup", "4", "--concurrency", "4", "--rounds", "1",
        "--duration", "120", "--pool-root", str(tmp_path / "pools"), "--out", str(tmp_path / "out"),
    ])
    on_disk = json.loads((tmp_path / "out/results.json").read_text())
    assert set(on_disk["scenarios"]) == {
        "few", "loraswap-r4-zipf", "peft_lru-r4-zipf", "loraswap-r4-uniform", "peft_lru-r4-uniform"
    }
    for scenario in on_disk["scenarios"].values():
        assert scenario["errors"] == 0 and scenario["requests"] == 12 and scenario["rss_peak_bytes"] > 0
    assert on_disk["scenarios"]["loraswap-r4-uniform"]["known_at_ready"] == 6
    assert results["ratio_vs_few"]["r4"] > 0 and results["ratio_vs_peft_lru"]["r4-uniform"] > 0
    assert (tmp_path / "out/throughput.png").exists() and (tmp_path / "out/latency.png").exists()


CHILD = """
import sys
sys.stdin.readline()
block = bytearray(160 * 2**20)  # zero-filled: every page written, so resident
del block
print("freed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the kernel's RSS high-water mark is Linux's")
def test_the_peak_is_the_kernels_high_water_mark_not_the_samples():
    # A process that holds 160 MiB only between two samples: psutil never sees it, VmHWM does; and
    # the reset on entry forgets what the process had resident before (its start-up here).
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with RssSampler({"child": child.pid}, interval_s=3600) as rss:
            before = rss.last["child"]
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "freed\n"
        assert rss.peak_source == "VmHWM"
        assert rss.sampled_peak["child"] < before + 64 * 2**20  # the samples (enter, exit) missed the block
        assert rss.peak["child"] >= before + 150 * 2**20
    finally:
        child.stdin.close()
        child.wait(10)
