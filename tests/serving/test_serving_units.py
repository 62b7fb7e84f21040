"""The Ray app's pieces without a cluster: version stamps, fleet health, hot-adapter spreading, the
mixed-batch split, and deploy/ray/serve.yaml against Ray Serve's own config schema."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import yaml

from app.errors import AdapterNotFound, NotReady
from app.serving.engine_client import EngineClient, EngineReply, FleetHealth, RemoteNLIService
from app.serving.versions import AdapterChange, AdapterVersions, AppliedVersions
from app.services.nli import Classification, PairInput

REPO = Path(__file__).resolve().parents[2]


def test_a_replica_applies_every_change_it_is_behind_on_in_version_order():
    versions = AdapterVersions()
    versions.commit("a", AdapterChange(versions.reserve(), "/x/a1"))
    versions.commit("b", AdapterChange(versions.reserve(), "/x/b1"))
    versions.reserve()  # a change that failed: a gap, nothing to apply
    versions.commit("a", AdapterChange(versions.reserve(), None))
    replica = AppliedVersions()
    assert [(n, c.version, c.deleted) for n, c in replica.behind(versions.snapshot())] == [("b", 2, False), ("a", 4, True)]
    assert versions.committed == 4
    replica.applied("b", 2)
    replica.applied("a", 4)
    assert replica.behind(versions.snapshot()) == []
    versions.commit("a", AdapterChange(versions.reserve(), "/x/a2"))
    assert [(n, c.version) for n, c in replica.behind(versions.snapshot())] == [("a", 5)]
    assert replica.version_of("a") == 4


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fleet_health_is_down_only_after_a_failure_and_no_answer_for_a_while(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("app.serving.engine_client.time.monotonic", clock)
    health = FleetHealth(down_after_s=10.0)
    assert health.readiness_reason() == "no engine replica is ready"
    health.ok()
    assert health.readiness_reason() is None and not health.down()
    clock.now += 30
    assert not health.down()  # quiet, not failing
    health.failed()
    assert health.down() and health.readiness_reason() == "no engine replica is ready"
    health.ok()
    assert not health.down()


class _FakeHandle:
    """Answers `classify` like a replica would (one label per pair) and records the model ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[PairInput]]] = []
        self.release = asyncio.Event()
        self.hold = False

    def options(self, *, method_name: str, multiplexed_model_id: str):
        handle = self

        class _Bound:
            def remote(self, pairs, batch_field, versions):
                handle.calls.append((multiplexed_model_id, pairs))
                return handle._answer(pairs)

        return _Bound()

    async def _answer(self, pairs):
        if self.hold:
            await self.release.wait()
        if any(p.adapter == "missing" for p in pairs):
            return EngineReply("r", error=AdapterNotFound("no adapter named 'missing'"))
        return EngineReply("r", results=[Classification(p.premise, {p.premise: 1.0}, p.adapter or "mnli") for p in pairs])


def test_a_hot_adapter_past_its_inflight_share_goes_out_without_affinity():
    async def scenario():
        handle = _FakeHandle()
        handle.hold = True
        service = RemoteNLIService(
            EngineClient(handle, AdapterVersions(), timeout_s=5), default_adapter="mnli",
            max_pairs_per_request=256, spread_inflight=3,
        )
        tasks = [asyncio.create_task(service.classify([PairInput(str(i), "h", "hot")])) for i in range(8)]
        while len(handle.calls) < 8:
            await asyncio.sleep(0)
        handle.release.set()
        await asyncio.gather(*tasks)
        return [model_id for model_id, _ in handle.calls]

    assert asyncio.run(scenario()) == ["hot", "hot", "hot", "", "", "", "", ""]


@pytest.mark.parametrize("split", [False, True])
def test_a_mixed_batch_is_answered_in_input_order_whole_or_split(split):
    handle = _FakeHandle()
    service = RemoteNLIService(
        EngineClient(handle, AdapterVersions(), timeout_s=5), default_adapter="mnli",
        max_pairs_per_request=256, split_mixed_batches=split,
    )
    pairs = [PairInput(str(i), "h", a) for i, a in enumerate(["a", "b", None, "a", "b"])]
    results = asyncio.run(service.classify(pairs, batch_field="pairs"))
    assert [(r.label, r.adapter) for r in results] == [("0", "a"), ("1", "b"), ("2", "mnli"), ("3", "a"), ("4", "b")]
    assert len(handle.calls) == (3 if split else 1)


def test_a_split_batch_with_an_error_is_answered_by_one_whole_call():
    handle = _FakeHandle()
    service = RemoteNLIService(
        EngineClient(handle, AdapterVersions(), timeout_s=5), default_adapter="mnli",
        max_pairs_per_request=256, split_mixed_batches=True,
    )
    pairs = [PairInput("0", "h", "a"), PairInput("1", "h", "missing")]
    with pytest.raises(AdapterNotFound):
        asyncio.run(service.classify(pairs, batch_field="pairs"))
    assert [len(p) for _, p in handle.calls] == [1, 1, 2]


def test_no_engine_replica_ready_is_503_with_retry_after_at_once(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("app.serving.engine_client.time.monotonic", clock)
    handle = _FakeHandle()
    client = EngineClient(handle, AdapterVersions(), timeout_s=5)
    client.health.ok()
    clock.now += 1
    client.health.failed()
    clock.now += 60
    with pytest.raises(NotReady) as caught:
        asyncio.run(client.call("classify", [], ""))
    assert caught.value.status_code == 503 and caught.value.retry_after_s > 0
    assert handle.calls == []


def test_serve_yaml_is_a_valid_ray_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text()))
    [app] = config.applications
    assert app.import_path == "app.serving.ray_app:app_builder"
    engine = {d.name: d for d in app.deployments}["LoraswapEngine"]
    assert engine.ray_actor_options.num_gpus == 1
    assert engine.autoscaling_config["min_replicas"] >= 1 and engine.autoscaling_config["max_replicas"] >= 2


# -- an engine replica catching up on adapter changes (its real registry, a gated fake loader) --------


class _GatedLoader:
    """Loads any directory; a load from a path named in `gated` waits for `gate`. Counts finished loads."""

    def __init__(self, *gated: str):
        self.gated = set(gated)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.finished = 0

    def read_adapter(self, name, path, labels=None):
        from tests.services.test_adapter_registry import FakeAdapter, LoadError

        if path.name in self.gated:
            self.started.set()
            self.gate.wait(10)
        self.finished += 1
        if path.name.startswith("bad"):
            raise LoadError("invalid", "bad adapter")
        return FakeAdapter(name, path)


def _replica(tmp_path: Path, loader: _GatedLoader, *dirs: str):
    """An EngineDeployment replica's catch-up state around a real AdapterService and registry (no Ray,
    no model: the replica's __init__, which builds a Runtime, is bypassed)."""
    from types import SimpleNamespace

    from app.serving.ray_app import EngineDeployment
    from app.services.adapter_registry import AdapterRegistry
    from app.services.adapters import AdapterService
    from tests.services.fakes import FakeDevice

    for name in dirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry(loader, FakeDevice(), roots=[tmp_path])
    registry.discover(tmp_path)
    cls = EngineDeployment.func_or_class
    replica = cls.__new__(cls)
    replica.name = "replica-under-test"
    replica.runtime = SimpleNamespace(
        adapter_service=AdapterService(registry, roots=[tmp_path], admin_token=None), close=lambda: None
    )
    replica._applied = AppliedVersions()
    replica._change_lock = asyncio.Lock()
    return replica, registry


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_catch_up_whose_caller_is_cancelled_still_completes_before_a_newer_one(tmp_path):
    """The flaky PUT/DELETE test on a loaded machine: a catch-up cancelled mid-load (the ingress's probe
    timed out) left the registry loading with the lock free; the next request's catch-up got 409, took
    it as applied, and the replica answered 404 — or the older version — under the newer stamp."""
    loader = _GatedLoader("v1")
    replica, registry = _replica(tmp_path, loader, "v1", "v2")

    async def scenario():
        first = asyncio.create_task(replica._catch_up({"swap": AdapterChange(1, str(tmp_path / "v1"))}))
        await _until(loader.started.is_set)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        newer = asyncio.create_task(replica._catch_up({"swap": AdapterChange(2, str(tmp_path / "v2"))}))
        await asyncio.wait({newer}, timeout=1.0)
        waited = not newer.done()  # it waits for the cancelled caller's load, which still runs
        loader.gate.set()
        await newer
        await _until(lambda: loader.finished >= 1)  # the cancelled caller's load has ended too
        return waited

    assert asyncio.run(scenario())
    assert replica._applied.version_of("swap") == 2
    assert replica.runtime.adapter_service.describe("swap").path == str(tmp_path / "v2")
    registry.close()


def test_a_catch_up_waits_for_a_first_requests_load_of_the_same_name(tmp_path):
    loader = _GatedLoader("swap")
    replica, registry = _replica(tmp_path, loader, "swap", "v2")

    async def scenario():
        lease = registry.lease(["swap"])
        first_use = asyncio.create_task(lease.weights())  # the on-disk version loading for a request
        await _until(loader.started.is_set)
        change = asyncio.create_task(replica._catch_up({"swap": AdapterChange(1, str(tmp_path / "v2"))}))
        await asyncio.wait({change}, timeout=0.5)
        waited = not change.done()
        loader.gate.set()
        await first_use
        lease.release()
        await change
        return waited

    assert asyncio.run(scenario())
    assert replica.runtime.adapter_service.describe("swap").path == str(tmp_path / "v2")
    registry.close()


def test_a_change_a_replica_cannot_apply_leaves_no_older_version_serving(tmp_path):
    loader = _GatedLoader()
    replica, registry = _replica(tmp_path, loader, "swap", "bad-v2")
    asyncio.run(replica._catch_up({"swap": AdapterChange(1, str(tmp_path / "swap"))}))
    assert replica.runtime.adapter_service.describe("swap").path == str(tmp_path / "swap")
    asyncio.run(replica._catch_up({"swap": AdapterChange(2, str(tmp_path / "bad-v2"))}))
    with pytest.raises(AdapterNotFound):
        replica.runtime.adapter_service.describe("swap")
    assert replica._applied.version_of("swap") == 2
    registry.close()


# -- the ingress's /metrics: its own series and every engine replica's ---------------------------------


def _engine_text(pairs: list[int]) -> str:
    from prometheus_client import generate_latest

    from app.services.metrics import Metrics

    metrics = Metrics()
    for size in pairs:
        metrics.observe_batch(size, [0.001] * size)
    return generate_latest(metrics.registry).decode()


def _samples(text: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    }


class _Pending:
    def __init__(self, answer, delay_s: float = 0.0, error: Exception | None = None):
        self.answer, self.delay_s, self.error = answer, delay_s, error

    async def get_async(self):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.answer


class _BroadcastHandle:
    """A deployment handle's `broadcast` as Ray 2.60 shapes it: one pending result per live replica."""

    def __init__(self, pending: list[_Pending]):
        self.pending = pending
        self.methods: list[str] = []

    def broadcast(self, method: str):
        self.methods.append(method)
        pending = self.pending

        class _Response:
            async def _fetch_replica_results_async(self):
                return pending

        return _Response()


def test_the_ingress_metrics_hold_each_replicas_series_labelled_and_its_own_http_series():
    from app.serving.fleet_metrics import FleetMetrics
    from app.services.metrics import Metrics

    ingress = Metrics()
    ingress.requests.labels("/nli", "POST", "200").inc(5)
    handle = _BroadcastHandle([_Pending(("r1", _engine_text([4, 2]))), _Pending(("r2", _engine_text([3])))])
    text = asyncio.run(FleetMetrics(handle, ingress.registry, timeout_s=1.0).render()).decode()
    assert handle.methods == ["metrics_text"]
    counts = _samples(text, "loraswap_batch_size_pairs_sum")
    assert counts == {(("replica", "r1"),): 6.0, (("replica", "r2"),): 3.0}  # no unlabelled ingress copy
    assert _samples(text, "loraswap_http_requests_total") == {
        (("method", "POST"), ("route", "/nli"), ("status", "200")): 5.0
    }
    assert {labels for labels in _samples(text, "process_resident_memory_bytes")} == {
        (), (("replica", "r1"),), (("replica", "r2"),)
    }
    assert _samples(text, "loraswap_fleet_metrics_replicas") == {
        (("outcome", "answered"),): 2.0, (("outcome", "skipped"),): 0.0
    }
    assert text.count("# TYPE loraswap_batch_size_pairs histogram") == 1


def test_a_replica_that_does_not_answer_in_time_is_skipped_and_counted_never_failing_the_scrape():
    from app.serving.fleet_metrics import FleetMetrics
    from app.services.metrics import Metrics

    ingress = Metrics()
    handle = _BroadcastHandle([
        _Pending(("r1", _engine_text([4]))),
        _Pending(("r2", _engine_text([3])), delay_s=30),
        _Pending(None, error=RuntimeError("replica died")),
    ])
    fleet = FleetMetrics(handle, ingress.registry, timeout_s=0.2)

    async def two_scrapes():
        return (await fleet.render()).decode(), (await fleet.render()).decode()

    _, text = asyncio.run(two_scrapes())
    assert _samples(text, "loraswap_batch_size_pairs_sum") == {(("replica", "r1"),): 4.0}
    assert _samples(text, "loraswap_fleet_metrics_replicas") == {
        (("outcome", "answered"),): 1.0, (("outcome", "skipped"),): 2.0
    }
    assert _samples(text, "loraswap_fleet_metrics_skipped_replicas_total") == {(): 4.0}


def test_no_engine_replica_to_ask_leaves_the_ingress_series():
    from app.serving.fleet_metrics import FleetMetrics
    from app.services.metrics import Metrics

    class _NoReplicas:
        def broadcast(self, method):
            raise RuntimeError("deployment unavailable")

    ingress = Metrics()
    ingress.requests.labels("/readyz", "GET", "503").inc()
    text = asyncio.run(FleetMetrics(_NoReplicas(), ingress.registry).render()).decode()
    assert _samples(text, "loraswap_http_requests_total")
    assert _samples(text, "loraswap_fleet_metrics_replicas")[(("outcome", "answered"),)] == 0.0


def test_the_ingress_app_serves_metrics_from_the_fleet_not_its_registry_alone():
    """FastAPI keeps included routers whole: the fleet route must match before the single server's."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.serving.fleet_metrics import FleetMetrics
    from app.serving.ray_app import build_ingress_app

    app = build_ingress_app(Settings(fraud_enabled=False, nli_enabled=False), None, {})
    handle = _BroadcastHandle([_Pending(("r1", _engine_text([2])))])
    app.state.fleet_metrics = FleetMetrics(handle, app.state.metrics.registry)
    answer = TestClient(app).get("/metrics")  # no lifespan: nothing to reach
    assert answer.status_code == 200
    assert _samples(answer.text, "loraswap_batch_size_pairs_sum") == {(("replica", "r1"),): 2.0}


# -- the affinity router's ranking (app.serving.adapter_router.AffinityPolicy) -----------------------


class _Replica:
    def __init__(self, replica_id: str, *held: str):
        self.replica_id = replica_id
        self.routing_stats = {"adapters": list(held)}

    def __repr__(self) -> str:
        return self.replica_id


def _ids(groups) -> list[set[str]]:
    return [{r.replica_id for r in group} for group in groups]


def _policy(**kwargs):
    import random

    from app.serving.adapter_router import AffinityPolicy

    return AffinityPolicy(rng=random.Random(0), **kwargs)


def test_the_router_prefers_replicas_holding_the_adapter_and_falls_back_to_the_others():
    replicas = [_Replica("a", "hot"), _Replica("b"), _Replica("c", "hot", "x"), _Replica("d")]
    ranked = _policy(spill_queue_len=4).rank("hot", replicas, lambda r: 0)
    assert _ids(ranked)[0] == {"a", "c"}
    assert _ids(ranked)[1] <= {"b", "d"} and len(ranked[1]) == 2


def test_a_busy_hot_adapter_spills_to_a_replica_without_it_which_then_counts_as_a_holder():
    clock = _Clock()
    policy = _policy(spill_queue_len=4, remember_s=5.0, clock=clock)
    replicas = [_Replica("a", "hot"), _Replica("b")]
    queue = {"a": 4, "b": 0}
    first = _ids(policy.rank("hot", replicas, lambda r: queue[r.replica_id]))[0]
    assert first == {"a", "b"}  # a is 4 busier than b: b competes on queue length
    queue["a"] = 3
    assert _ids(policy.rank("hot", replicas, lambda r: queue[r.replica_id]))[0] == {"a"}
    queue["a"], queue["b"] = 30, 27  # busy everywhere is no reason to give up affinity
    assert _ids(policy.rank("hot", replicas, lambda r: queue[r.replica_id]))[0] == {"a"}
    queue["a"], queue["b"] = 4, 0
    policy.sent("hot", "b")  # Ray chose b for the spilled request
    assert _ids(policy.rank("hot", replicas, lambda r: queue[r.replica_id])) == [{"a", "b"}]
    queue["a"] = 0
    clock.now += 6  # b never reported it (evicted, say): after remember_s it is no holder again
    assert _ids(policy.rank("hot", replicas, lambda r: queue[r.replica_id]))[0] == {"a"}


def test_an_adapter_held_nowhere_goes_to_its_home_replica_and_no_adapter_to_two_random_ones():
    replicas = [_Replica(c) for c in "abcd"]
    policy = _policy()
    [group] = policy.rank("", replicas, lambda r: None)
    assert len(group) == 2 and len({r.replica_id for r in group}) == 2
    homes = {}
    for i in range(40):
        first = _ids(policy.rank(f"cold-{i}", replicas, lambda r: 0))[0]
        assert len(first) == 1 and first == _ids(policy.rank(f"cold-{i}", list(reversed(replicas)), lambda r: 0))[0]
        homes[i] = first.pop()
    assert set(homes.values()) == set("abcd")  # the tail is partitioned over every replica
    moved = {i for i in homes if _ids(policy.rank(f"cold-{i}", replicas[:3], lambda r: 0))[0] != {homes[i]}}
    assert moved == {i for i in homes if homes[i] == "d"}  # a replica leaving moves only its own adapters
    assert _ids(policy.rank("x", replicas[:1], lambda r: None)) == [{"a"}]


def test_unknown_queue_lengths_spill_nothing():
    replicas = [_Replica("a", "hot"), _Replica("b")]
    assert _ids(_policy(spill_queue_len=1).rank("hot", replicas, lambda r: None))[0] == {"a"}
