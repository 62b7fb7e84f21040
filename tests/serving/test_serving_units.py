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
