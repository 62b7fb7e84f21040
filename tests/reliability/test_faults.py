"""Faults: broken adapter files, a vanished adapters directory, a tampered fraud artifact, a batch that
raises, a client that goes away while queued. Each gives a clear, typed error to whom it concerns and
nothing to anyone else, and the server stays up.

Loader-level tables of bad adapters and bad fraud artifacts are in tests/inference/test_adapter_loader.py
and tests/inference/test_fraud_scorer.py; here the same damage goes through the running app."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.inference.test_adapter_loader import (
    corrupt_safetensors,
    no_labels_anywhere,
    modified_after_training,
    other_base,
    pickle_dressed_as_safetensors,
    pickle_instead,
    truncated_safetensors,
)
from tests.reliability.conftest import (
    HYPOTHESIS,
    PREMISE,
    SHIPPED_FRAUD,
    copy_adapters,
    scores_close,
    settings_for,
    well_formed,
)

TX = {"Time": 10.0, **{f"V{i}": 0.1 * i for i in range(1, 29)}, "Amount": 12.5}


class Payload:
    """A pickle that creates `marker` when unpickled: proof that nothing unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def root(embedded_adapters, tmp_path_factory) -> Path:
    return copy_adapters(embedded_adapters, tmp_path_factory.mktemp("fault-adapters"))


@pytest.fixture(scope="module")
def client(root):
    settings = settings_for(root, max_queue_wait_ms=60_000, max_batch_wait_ms=5, max_batch_pairs=4)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def nli(client, adapter="alpha", premise=PREMISE):
    return client.post("/nli", json={"premise": premise, "hypothesis": HYPOTHESIS, "adapter": adapter})


def known(client) -> set:
    """What serves: each ready adapter (a refused load leaves only a failed trace, with its reason)."""
    adapters = client.get("/adapters").json()["adapters"]
    return {(a["name"], a["path"], a["size_bytes"]) for a in adapters if a["state"] == "ready"}


# -- broken adapters, loaded at runtime ------------------------------------------------------------------


def empty_directory(p: Path) -> None:
    shutil.rmtree(p)
    p.mkdir()


def malicious_pickle_as_weights(p: Path) -> None:
    (p / "adapter_model.safetensors").write_bytes(pickle.dumps(Payload(p.parent / f"{p.name}.unpickled")))


def malicious_pickle_as_bin(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()
    (p / "adapter_model.bin").write_bytes(pickle.dumps(Payload(p.parent / f"{p.name}.unpickled")))


def metadata_names_a_file_outside(p: Path) -> None:
    meta = json.loads((p / "metadata.json").read_text())
    meta["files"]["../../../../etc/passwd"] = "sha256:" + "0" * 64
    (p / "metadata.json").write_text(json.dumps(meta))


BAD_ADAPTERS = [
    corrupt_safetensors,
    truncated_safetensors,
    no_labels_anywhere,
    other_base,
    modified_after_training,
    pickle_instead,
    pickle_dressed_as_safetensors,
    malicious_pickle_as_weights,
    malicious_pickle_as_bin,
    metadata_names_a_file_outside,
    empty_directory,
]


@pytest.mark.parametrize("damage", BAD_ADAPTERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("target", ["new-name", "alpha"], ids=["load", "replace"])
def test_bad_adapter_is_refused_to_its_loader_and_changes_nothing(client, root, damage, target):
    source = root / "spare" / f"{damage.__name__}-{target}"
    shutil.copytree(root / "alpha", source)
    damage(source)
    before, alpha_before = known(client), nli(client).json()["scores"]

    response = client.put(f"/adapters/{target}", json={"path": str(source)})

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_invalid" and error["message"]
    assert known(client) == before  # a failed replace keeps the old adapter, a failed load serves nothing
    assert client.get(f"/adapters/{target}").json()["error"]  # and the refusal is on record
    after = nli(client)
    assert after.status_code == 200 and scores_close(after.json()["scores"], alpha_before)
    assert not (source.parent / f"{source.name}.unpickled").exists(), "a pickle was unpickled"


def test_adapter_trained_on_another_base_is_refused(client, root, roberta_adapters):
    """A real adapter of another base (a tiny RoBERTa), not a doctored fingerprint."""
    source = root / "spare" / "roberta-alpha"
    shutil.copytree(roberta_adapters / "alpha", source)
    response = client.put("/adapters/foreign", json={"path": str(source)})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "adapter_invalid"
    assert "base" in response.json()["error"]["message"]
    record = client.get("/adapters/foreign").json()  # the refusal is on record, and nothing serves
    assert record["state"] == "failed" and record["error"]
    refused = nli(client, "foreign")  # a request for it is refused with the reason, not run
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "adapter_invalid"
    assert nli(client).status_code == 200


# -- the adapters directory goes away --------------------------------------------------------------------


def test_adapters_directory_missing_at_startup(tmp_path, embedded_adapters):
    missing = tmp_path / "no-such-dir"
    with TestClient(create_app(settings_for(missing, max_queue_wait_ms=60_000))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["missing"] == ["nli"]
        reason = next(c["reason"] for c in ready.json()["components"] if c["name"] == "nli")
        assert "alpha" in reason  # names the default adapter that is not loaded
        refused = nli(client)
        assert refused.status_code == 404 and refused.json()["error"]["details"]["available"] == []
        assert client.post("/fraud", json=TX).status_code == 200  # the other model is unaffected
        # The directory appears later: an adapter can be loaded and served without a restart.
        copy_adapters(embedded_adapters, missing, names=("alpha",))
        assert client.put("/adapters/alpha", json={"path": "alpha"}).status_code == 200
        served = nli(client)
        assert served.status_code == 200 and well_formed(served.json(), "alpha")


def test_readiness_follows_the_default_adapter_at_runtime(tmp_path, embedded_adapters):
    missing = tmp_path / "later"
    with TestClient(create_app(settings_for(missing, fraud_enabled=False, max_queue_wait_ms=60_000))) as client:
        copy_adapters(embedded_adapters, missing, names=("alpha",))
        assert client.put("/adapters/alpha", json={"path": "alpha"}).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_adapters_directory_removed_between_loads(tmp_path, embedded_adapters):
    root = copy_adapters(embedded_adapters, tmp_path / "vanishing", names=("alpha", "beta"))
    with TestClient(create_app(settings_for(root, fraud_enabled=False, max_queue_wait_ms=60_000))) as client:
        expected = nli(client).json()["scores"]
        shutil.rmtree(root)
        refused = client.put("/adapters/gamma", json={"path": "beta"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "adapter_not_found"
        refused_abs = client.put("/adapters/gamma", json={"path": str(root / "beta")})
        assert refused_abs.status_code == 404
        # What was loaded stays served from memory, and listed.
        served = nli(client)
        assert served.status_code == 200 and scores_close(served.json()["scores"], expected)
        assert {a["name"] for a in client.get("/adapters").json()["adapters"]} == {"alpha", "beta"}
        assert client.get("/readyz").status_code == 200
        # The directory comes back: loads work again.
        copy_adapters(embedded_adapters, root, names=("gamma",))
        assert client.put("/adapters/gamma", json={"path": "gamma"}).status_code == 200
        assert nli(client, "gamma").status_code == 200


# -- the fraud artifact ----------------------------------------------------------------------------------


def _flip_byte(directory: Path) -> None:
    artifact = directory / json.loads((directory / "manifest.json").read_text())["artifact"]["file"]
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))


def _malicious_joblib(directory: Path) -> None:
    artifact = json.loads((directory / "manifest.json").read_text())["artifact"]["file"]
    (directory / artifact).write_bytes(pickle.dumps(Payload(directory / "unpickled")))


@pytest.mark.parametrize("damage", [_flip_byte, _malicious_joblib], ids=["checksum mismatch", "malicious pickle"])
def test_tampered_fraud_artifact_fails_fraud_only(tmp_path, embedded_adapters, damage):
    """tests/api/test_fraud_api.py covers the 503s of a broken fraud model alone; here NLI runs beside it
    and must not notice, and a malicious pickle in place of the artifact is never opened."""
    model_dir = tmp_path / "fraud"
    shutil.copytree(SHIPPED_FRAUD, model_dir)
    damage(model_dir)
    root = copy_adapters(embedded_adapters, tmp_path / "adapters", names=("alpha",))
    with TestClient(create_app(settings_for(root, fraud_model_dir=model_dir, max_queue_wait_ms=60_000))) as client:
        refused = client.post("/fraud", json=TX)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "not_ready"
        assert "sha256" in refused.json()["error"]["message"] or "bytes" in refused.json()["error"]["message"]
        assert client.get("/readyz").json()["missing"] == ["fraud"]
        served = nli(client)
        assert served.status_code == 200 and well_formed(served.json(), "alpha")
    assert not (model_dir / "unpickled").exists()


# -- a batch that raises ---------------------------------------------------------------------------------


def test_exception_in_a_batch_fails_exactly_that_batch(client, monkeypatch, figures):
    """engine.run raises for any batch holding a `beta` row. Concurrent traffic to alpha, beta and gamma:
    every request whose pairs ran in such a batch gets the typed 500, every other request is answered,
    correctly, and none is lost."""
    engine = client.app.state.runtime.engine
    premise_of: dict[int, str] = {}
    outcome: dict[str, str] = {}
    lock = threading.Lock()
    real_encode, real_run = engine.encode, engine.run

    def encode(premises, hypotheses):
        encoded = real_encode(premises, hypotheses)
        with lock:
            premise_of.update({id(pair): p for pair, p in zip(encoded, premises)})
        return encoded

    def run(pairs, adapters):
        names = {a.name for a in adapters}
        with lock:
            premises = [premise_of[id(pair)] for pair in pairs]
        if "beta" in names:
            outcome.update(dict.fromkeys(premises, "failed"))
            raise RuntimeError("injected fault")
        outcome.update(dict.fromkeys(premises, "served"))
        return real_run(pairs, adapters)

    monkeypatch.setattr(engine, "encode", encode)
    monkeypatch.setattr(engine, "run", run)
    # One request in eight names beta; batches of at most 4 pairs, so many batches hold no beta row.
    requests = [(f"request {i}: {PREMISE}", "beta" if i % 8 == 3 else ("alpha", "gamma")[i % 2]) for i in range(80)]

    def send(item):
        premise, adapter = item
        return premise, adapter, nli(client, adapter, premise)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    monkeypatch.undo()

    failed = served = 0
    for premise, adapter, response in answers:
        assert premise in outcome, f"{premise!r} never reached the engine and got {response.status_code}"
        if outcome[premise] == "failed":
            failed += 1
            assert response.status_code == 500, response.text
            assert response.json()["error"]["code"] == "inference_failed"
        else:
            served += 1
            assert adapter != "beta"
            assert response.status_code == 200 and well_formed(response.json(), adapter)
            alone = nli(client, adapter, premise).json()["scores"]
            assert scores_close(response.json()["scores"], alone)
    beta = sum(1 for _, adapter, _ in answers if adapter == "beta")
    assert failed >= beta > 0 and served > 0
    figures("batch_fault_requests", len(answers))
    figures("batch_fault_failed_typed_500", failed)
    figures("batch_fault_served", served)
    assert nli(client, "beta").status_code == 200  # the fault was the injection, not the adapter


# -- admission after a slow batch ------------------------------------------------------------------------


def test_an_idle_server_admits_a_request_whatever_its_throughput_estimate(client):
    batcher = client.app.state.runtime.batcher
    saved = batcher.pairs_per_s
    batcher.pairs_per_s = 0.01  # what one slow batch can leave behind
    try:
        assert batcher.pending_pairs == 0
        assert nli(client).status_code == 200
    finally:
        batcher.pairs_per_s = saved


# -- a client that goes away while queued ----------------------------------------------------------------


def test_client_that_disconnects_while_queued_is_dropped_before_the_model(client, figures):
    engine = client.app.state.runtime.engine
    batcher = client.app.state.runtime.batcher
    gate, entered = threading.Event(), threading.Event()
    seen: list[list[str]] = []
    real_encode, real_run = engine.encode, engine.run
    premise_of: dict[int, str] = {}

    def encode(premises, hypotheses):
        encoded = real_encode(premises, hypotheses)
        premise_of.update({id(pair): p for pair, p in zip(encoded, premises)})
        return encoded

    def run(pairs, adapters):
        seen.append([premise_of[id(pair)] for pair in pairs])
        entered.set()
        gate.wait(30)
        return real_run(pairs, adapters)

    engine.encode, engine.run = encode, run
    try:
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(nli, client, "alpha", "the blocker")
            assert entered.wait(30)
            status = client.portal.call(_disconnect_while_queued, client.app, batcher)
            gate.set()
            assert blocker.result().status_code == 200
    finally:
        gate.set()
        del engine.encode, engine.run
    assert status in (None, 499)  # nobody reads it; the server may end the exchange either way
    assert all("the client that left" not in batch for batch in seen), seen
    assert all(e.in_use == 0 for e in client.app.state.runtime.registry.entries())  # its lease was released
    assert nli(client, "beta").status_code == 200
    figures("disconnected_while_queued_reached_model", False)


async def _disconnect_while_queued(app, batcher) -> int | None:
    body = json.dumps({"premise": "the client that left", "hypothesis": HYPOTHESIS, "adapter": "beta"}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/nli", "raw_path": b"/nli", "root_path": "", "query_string": b"", "state": {},
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("testclient", 50000), "server": ("testserver", 80),
    }
    gone = anyio.Event()
    delivered = False
    statuses: list[int] = []

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope, receive, send)
            while batcher.pending_pairs == 0:  # until its pair is queued behind the blocker
                await anyio.sleep(0.01)
            gone.set()
    return statuses[0] if statuses else None
