"""The adapter tiers through the real app on the embedded base: tier after every step (disk, host,
device, evicted, reloaded), identical answers after eviction and reload, a broken adapter that fails only
its own requests, a slow load that never holds up other adapters' batches, and memory really freed."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.test_nli_api import nli, settings_for


@pytest.fixture()
def root(embedded_adapters, tmp_path) -> Path:
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(embedded_adapters / name, tmp_path / name)
    return tmp_path


def tiers(client) -> dict[str, str]:
    return {a["name"]: a["tier"] for a in client.get("/adapters").json()["adapters"]}


def test_tier_after_every_step_and_the_same_answers_after_reload(root):
    # One device slot and one host place beyond the default: every other request moves something.
    settings = settings_for(root, max_resident_adapters=2, max_host_adapters=2)
    with TestClient(create_app(settings)) as client:
        runtime = client.app.state.runtime
        assert tiers(client) == {"alpha": "device", "beta": "disk", "gamma": "disk"}  # the default is preloaded
        first = {name: nli(client, name).json()["scores"] for name in ("beta", "gamma")}
        # beta then gamma: the host holds two (alpha was least recently used), the device two slots.
        assert tiers(client) == {"alpha": "disk", "beta": "device", "gamma": "device"}
        assert nli(client, "alpha").status_code == 200  # reloaded from disk, moved into a slot
        assert tiers(client) == {"alpha": "device", "beta": "disk", "gamma": "device"}
        again = {name: nli(client, name).json()["scores"] for name in ("beta", "gamma")}
        assert again == first  # evicted and reloaded: the same answers
        listing = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
        assert listing["beta"]["loads"] == 2 and listing["beta"]["host_evictions"] >= 1
        assert runtime.registry.host_count() <= 2


def test_a_broken_adapter_fails_its_own_requests_only(root):
    (root / "broken").mkdir()
    shutil.copy(root / "alpha" / "adapter_config.json", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with TestClient(create_app(settings_for(root))) as client:
        assert tiers(client)["broken"] == "disk"
        refused = nli(client, "broken")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "adapter_invalid"
        entry = client.get("/adapters/broken").json()
        assert entry["state"] == "failed" and entry["error"]
        assert nli(client, "broken").status_code == 422  # refused again without another load
        assert entry["loads"] == 0 and nli(client, "beta").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_slow_load_never_holds_up_batches_of_other_adapters(root):
    with TestClient(create_app(settings_for(root))) as client:
        engine = client.app.state.runtime.engine
        read = engine.read_adapter
        started, release = threading.Event(), threading.Event()

        def slow_read(name, path, labels=None):
            if name == "gamma":
                started.set()
                assert release.wait(30), "the test never released the slow load"
            return read(name, path, labels)

        engine.read_adapter = slow_read
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(nli, client, "gamma")
            assert started.wait(30)
            # While gamma's load is held, alpha (resident) and beta (a fast miss) are answered.
            assert nli(client, "alpha").status_code == 200
            assert nli(client, "beta").status_code == 200
            assert not waiting.done()
            release.set()
            assert waiting.result(30).status_code == 200


def test_concurrent_first_requests_load_once(root):
    with TestClient(create_app(settings_for(root))) as client:
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: nli(client, "gamma").json()["scores"], range(6)))
        # The same pair, batched differently from run to run: equal up to float summation order.
        assert all(abs(a[k] - answers[0][k]) < 1e-5 for a in answers for k in a), answers
        assert client.get("/adapters/gamma").json()["loads"] == 1


def test_delete_frees_host_and_device_memory(root):
    with TestClient(create_app(settings_for(root))) as client:
        runtime = client.app.state.runtime
        assert nli(client, "beta").status_code == 200
        weights = weakref.ref(runtime.registry.ready_adapter("beta"))
        device_bytes = runtime.engine.slots.bytes_held()
        hosts = runtime.registry.host_count()
        assert client.delete("/adapters/beta").json()["state"] == "unloaded"
        assert nli(client, "alpha").status_code == 200  # the next batch frees retired slots first
        gc.collect()
        assert weights() is None  # nothing holds the host copy any more
        assert runtime.registry.host_count() == hosts - 1
        assert runtime.engine.slots.bytes_held() < device_bytes  # its slot's head is gone
        assert runtime.engine.slots.counters()[0] == 1  # only alpha in a slot

