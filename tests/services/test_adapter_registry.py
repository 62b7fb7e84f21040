"""The registry's exact state and tier after every step: discover (disk), first use (host), host LRU
eviction and reload, single-flight loads, failures retried only when files change, replace, unload."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.errors import AdapterConflict, AdapterInvalid, AdapterNotFound, InvalidInput
from app.services.adapter_registry import AdapterRegistry, AdapterState
from tests.services.fakes import FakeDevice


@dataclass(eq=False)
class FakeAdapter:
    name: str
    path: Path
    labels: tuple[str, ...] = ("yes", "no")
    task: str = "fake"
    rank: int = 4
    target_modules: tuple[str, ...] = ("query",)
    base_id: str = "fake-base"
    size_bytes: int = 10
    metrics: dict = field(default_factory=dict)


class LoadError(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind, self.message = kind, message


class FakeLoader:
    """Loads any directory whose name does not start with 'bad'; 'missing' paths are not found."""

    def __init__(self):
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.calls: list[str] = []

    def read_adapter(self, name, path, labels=None):
        self.calls.append(name)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        if path.name.startswith("missing"):
            raise LoadError("not_found", f"no adapter directory at {path}")
        if path.name.startswith("bad"):
            raise LoadError("invalid", "bad adapter")
        return FakeAdapter(name, path)


def states(registry):
    return {e.name: (e.state, e.path.name, e.served_pairs) for e in registry.entries()}


def tiers(registry):
    return {e.name: registry.tier(e) for e in registry.entries()}


@pytest.fixture
def parts():
    loader, residency = FakeLoader(), FakeDevice()
    registry = AdapterRegistry(loader, residency, max_host=2)
    yield registry, loader, residency
    registry.close()


def adapter_dirs(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text("{}")
    return root


def use(registry, *names):
    """One request's lease: loads what is missing, returns the weights, releases."""
    lease = registry.lease(names)
    try:
        return registry.load_now(lease)
    finally:
        lease.release()


def test_tiers_known_host_evicted_reloaded(parts, tmp_path):
    registry, loader, residency = parts
    registry.discover(adapter_dirs(tmp_path, "a", "b", "c"))
    assert loader.calls == []  # known from the small files: no weights read at start-up
    assert states(registry) == {n: (AdapterState.KNOWN, n, 0) for n in "abc"}
    assert tiers(registry) == {"a": "disk", "b": "disk", "c": "disk"}

    first_a = use(registry, "a")["a"]
    assert (registry.entry("a").state, tiers(registry)["a"], registry.entry("a").loads) == (AdapterState.READY, "host", 1)
    use(registry, "b")
    assert tiers(registry) == {"a": "host", "b": "host", "c": "disk"}
    use(registry, "c")  # the host holds two: a, least recently used, goes back to disk
    assert tiers(registry) == {"a": "disk", "b": "host", "c": "host"}
    assert registry.entry("a").host_evictions == 1 and residency.retired == [first_a]
    assert registry.host_count() == 2

    again = use(registry, "a")["a"]  # reloaded on its next use
    assert again is not first_a and registry.entry("a").loads == 2
    assert tiers(registry) == {"a": "host", "b": "disk", "c": "host"}
    assert loader.calls == ["a", "b", "c", "a"]


def test_leased_and_pinned_adapters_stay_on_the_host(parts, tmp_path):
    registry, _, residency = parts
    residency.pinned = {"a"}
    registry.discover(adapter_dirs(tmp_path, "a", "b", "c", "d"))
    use(registry, "a")
    held = registry.lease(["b"])
    registry.load_now(held)
    use(registry, "c")  # over capacity, but a is pinned and b is leased: both stay
    assert tiers(registry)["a"] == "host" and tiers(registry)["b"] == "host"
    held.release()  # released: now b may go
    use(registry, "d")
    assert tiers(registry) == {"a": "host", "b": "disk", "c": "disk", "d": "host"}


def test_concurrent_first_requests_load_once(parts, tmp_path):
    registry, loader, _ = parts
    registry.discover(adapter_dirs(tmp_path, "a"))
    loader.gate = threading.Event()
    leases = [registry.lease(["a"]) for _ in range(5)]
    results = []
    threads = [threading.Thread(target=lambda lease=lease: results.append(registry.load_now(lease)["a"])) for lease in leases]
    for thread in threads:
        thread.start()
    assert loader.started.wait(5)
    assert registry.entry("a").state is AdapterState.LOADING
    loader.gate.set()
    for thread in threads:
        thread.join(5)
    for lease in leases:
        lease.release()
    assert loader.calls == ["a"] and len(results) == 5 and all(r is results[0] for r in results)


def test_a_broken_adapter_fails_its_request_and_is_retried_only_when_its_files_change(parts, tmp_path):
    registry, loader, _ = parts
    registry.discover(adapter_dirs(tmp_path, "bad-one", "good"))
    with pytest.raises(AdapterInvalid):
        use(registry, "bad-one")
    assert states(registry)["bad-one"] == (AdapterState.FAILED, "bad-one", 0)
    assert registry.entry("bad-one").error == "bad adapter"
    with pytest.raises(AdapterInvalid):
        use(registry, "bad-one")  # same files: refused without another load
    assert loader.calls == ["bad-one"]
    assert use(registry, "good")["good"].name == "good"  # nobody else notices
    (tmp_path / "bad-one" / "adapter_config.json").write_text('{"changed": true}')
    with pytest.raises(AdapterInvalid):
        use(registry, "bad-one")  # files changed: tried again
    assert loader.calls == ["bad-one", "good", "bad-one"]


def test_a_directory_added_after_start_up_is_found_on_first_request(tmp_path):
    loader, residency = FakeLoader(), FakeDevice()
    registry = AdapterRegistry(loader, residency, roots=[tmp_path / "first", tmp_path / "second"])
    (tmp_path / "first").mkdir()
    registry.discover(tmp_path / "first")
    with pytest.raises(AdapterNotFound):
        registry.lease(["late"])
    (tmp_path / "second").mkdir()  # a root, and an adapter in it, that appear while serving
    adapter_dirs(tmp_path / "second", "late")
    assert use(registry, "late")["late"].path == tmp_path / "second" / "late"
    registry.close()


def test_put_replace_fail_unload_exact_state(parts, tmp_path):
    registry, _, residency = parts
    assert states(registry) == {}
    registry.load("one", tmp_path / "v1")
    assert states(registry) == {"one": (AdapterState.READY, "v1", 0)}
    first = use(registry, "one")["one"]
    registry.record_served(first, 3)
    assert states(registry) == {"one": (AdapterState.READY, "v1", 3)}

    registry.load("one", tmp_path / "v2")  # a replace retires the old weights and starts counting again
    assert states(registry) == {"one": (AdapterState.READY, "v2", 0)} and registry.entry("one").version == 2
    assert residency.retired == [first]
    second = use(registry, "one")["one"]
    registry.record_served(first, 5)  # pairs of the old weights, answered after the replace
    registry.record_served(second, 2)
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2)}

    with pytest.raises(AdapterInvalid):
        registry.load("one", tmp_path / "bad")  # a failed replace leaves the old adapter serving
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2)}
    assert "bad adapter" in registry.entry("one").error
    assert use(registry, "one")["one"] is second

    with pytest.raises(AdapterInvalid):
        registry.load("two", tmp_path / "bad")  # a failed new load is known as failed, with its reason
    assert states(registry)["two"] == (AdapterState.FAILED, "bad", 0)
    with pytest.raises(AdapterNotFound):
        registry.load("three", tmp_path / "missing")  # nothing at the path: no trace
    assert set(states(registry)) == {"one", "two"}

    assert registry.unload("two").state is AdapterState.UNLOADED
    gone = registry.unload("one")
    assert (gone.state, gone.adapter) == (AdapterState.UNLOADED, second)
    assert states(registry) == {} and registry.host_count() == 0
    assert residency.retired == [first, second]
    with pytest.raises(AdapterNotFound):
        registry.unload("one")
    with pytest.raises(AdapterNotFound):
        registry.lease(["one"])


def test_discover_records_invalid_metadata_and_skips_bad_names(parts, tmp_path):
    registry, _, _ = parts
    for name in ("good", "broken", "Not_A_Slug"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "broken" / "metadata.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    registry.discover(tmp_path)
    assert states(registry) == {"broken": (AdapterState.FAILED, "broken", 0), "good": (AdapterState.KNOWN, "good", 0)}
    assert "metadata.json" in registry.entry("broken").error
    assert registry.servable_names() == ["good"]
    with pytest.raises(AdapterInvalid):
        registry.lease(["broken"])


def test_discover_of_missing_directory_is_empty(parts, tmp_path):
    registry, _, _ = parts
    registry.discover(tmp_path / "nowhere")
    assert states(registry) == {}


@pytest.mark.parametrize("name", ["", "UPPER", "../x", "a/b", "a" * 65, "-lead", "dot.name", "nul\x00"])
def test_invalid_names_are_refused(parts, tmp_path, name):
    registry, _, _ = parts
    with pytest.raises(InvalidInput):
        registry.load(name, tmp_path / "v1")
    assert states(registry) == {}


def test_a_put_during_a_load_of_the_same_name_conflicts(parts, tmp_path):
    registry, loader, _ = parts
    loader.gate = threading.Event()
    worker = threading.Thread(target=registry.load, args=("slow", tmp_path / "v1"))
    worker.start()
    assert loader.started.wait(5)
    with pytest.raises(AdapterConflict):
        registry.load("slow", tmp_path / "v2")
    with pytest.raises(AdapterConflict):
        registry.unload("slow")
    loader.gate.set()
    worker.join(5)
    assert states(registry) == {"slow": (AdapterState.READY, "v1", 0)}
