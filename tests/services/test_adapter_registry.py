"""The registry's exact state after every step: discover, load, replace, fail, unload, conflict."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.errors import AdapterConflict, AdapterInvalid, AdapterNotFound, InvalidInput
from app.services.adapter_registry import AdapterRegistry, AdapterState


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

    def read_adapter(self, name, path, labels=None):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        if path.name.startswith("missing"):
            raise LoadError("not_found", f"no adapter directory at {path}")
        if path.name.startswith("bad"):
            raise LoadError("invalid", "bad adapter")
        return FakeAdapter(name, path)


class FakeResidency:
    def __init__(self):
        self.retired = []

    def is_resident(self, adapter):
        return False

    def is_pinned(self, name):
        return False

    def retire(self, adapter):
        self.retired.append(adapter)


def states(registry):
    return {e.name: (e.state, e.path.name, e.served_pairs) for e in registry.entries()}


@pytest.fixture
def parts():
    loader, residency = FakeLoader(), FakeResidency()
    return AdapterRegistry(loader, residency), loader, residency


def test_lifecycle_exact_state_after_each_step(parts, tmp_path):
    registry, _, residency = parts
    assert states(registry) == {}

    registry.load("one", tmp_path / "v1")
    assert states(registry) == {"one": (AdapterState.READY, "v1", 0)}

    first = registry.resolve("one")
    assert states(registry) == {"one": (AdapterState.READY, "v1", 0)}  # resolving serves nothing yet
    registry.record_served(first, 3)
    assert states(registry) == {"one": (AdapterState.READY, "v1", 3)}

    registry.load("one", tmp_path / "v2")  # a replace retires the old weights and starts counting again
    assert states(registry) == {"one": (AdapterState.READY, "v2", 0)}
    assert residency.retired == [first]
    second = registry.resolve("one")
    assert second is not first
    registry.record_served(first, 5)  # pairs of the old weights, answered after the replace
    registry.record_served(second, 2)
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2)}

    with pytest.raises(AdapterInvalid):
        registry.load("one", tmp_path / "bad")  # a failed replace leaves the old adapter serving
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2)}
    assert "bad adapter" in registry.entry("one").error
    assert registry.resolve("one") is second

    with pytest.raises(AdapterInvalid):
        registry.load("two", tmp_path / "bad")  # a failed new load is known as failed, with its reason
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2), "two": (AdapterState.FAILED, "bad", 0)}
    assert registry.entry("two").error == "bad adapter"

    with pytest.raises(AdapterNotFound):
        registry.load("three", tmp_path / "missing")  # nothing at the path: no trace
    assert states(registry) == {"one": (AdapterState.READY, "v2", 2), "two": (AdapterState.FAILED, "bad", 0)}

    assert registry.unload("two").state is AdapterState.UNLOADED
    gone = registry.unload("one")
    assert (gone.state, gone.adapter) == (AdapterState.UNLOADED, second)
    assert states(registry) == {}
    assert residency.retired == [first, second]
    with pytest.raises(AdapterNotFound):
        registry.unload("one")
    with pytest.raises(AdapterNotFound):
        registry.resolve("one")


def test_discover_records_failures_and_skips_bad_names(parts, tmp_path):
    registry, _, _ = parts
    for name in ("good", "bad-one", "Not_A_Slug"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    registry.discover(tmp_path)
    assert states(registry) == {
        "bad-one": (AdapterState.FAILED, "bad-one", 0),
        "good": (AdapterState.READY, "good", 0),
    }
    assert registry.entry("bad-one").error == "bad adapter"
    assert registry.ready_names() == ["good"]
    with pytest.raises(AdapterNotFound) as caught:
        registry.resolve("bad-one")
    assert caught.value.details["available"] == ["good"]


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


def test_concurrent_load_of_same_name_conflicts_and_new_name_is_invisible(parts, tmp_path):
    registry, loader, _ = parts
    loader.gate = threading.Event()
    worker = threading.Thread(target=registry.load, args=("slow", tmp_path / "v1"))
    worker.start()
    assert loader.started.wait(5)
    assert states(registry) == {"slow": (AdapterState.LOADING, "v1", 0)}
    with pytest.raises(AdapterNotFound):
        registry.resolve("slow")  # not visible to requests until validated
    with pytest.raises(AdapterConflict):
        registry.load("slow", tmp_path / "v2")
    with pytest.raises(AdapterConflict):
        registry.unload("slow")
    loader.gate.set()
    worker.join(5)
    assert states(registry) == {"slow": (AdapterState.READY, "v1", 0)}
