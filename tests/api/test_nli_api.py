"""The NLI and adapter-management API through the real app on the embedded base: happy paths, every
422 case, unknown adapters, authorisation, and load/replace/unload while other traffic is in flight."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

PREMISE, HYPOTHESIS = "A man is playing a guitar on stage.", "A person is making music."


def settings_for(root: Path, **overrides) -> Settings:
    options = dict(
        fraud_enabled=False,
        adapters_dir=root,
        default_adapter="alpha",
        max_text_chars=200,
        max_pairs_per_request=8,
        max_batch_wait_ms=1,
    )
    options.update(overrides)
    return Settings(**options)


@pytest.fixture(scope="module")
def adapters_root(embedded_adapters, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    for name in ("alpha", "beta"):
        shutil.copytree(embedded_adapters / name, root / name)
    shutil.copytree(embedded_adapters / "gamma", root / "spare" / "gamma")  # loadable, not discovered
    (root / "spare" / "gamma-copy").mkdir()
    return root


@pytest.fixture(scope="module")
def client(adapters_root):
    with TestClient(create_app(settings_for(adapters_root))) as test_client:
        yield test_client


def nli(client, adapter=None, premise=PREMISE, hypothesis=HYPOTHESIS):
    body = {"premise": premise, "hypothesis": hypothesis}
    if adapter:
        body["adapter"] = adapter
    return client.post("/nli", json=body)


def test_ready_and_single_pair(client):
    assert client.get("/readyz").status_code == 200
    response = nli(client)
    assert response.status_code == 200
    body = response.json()
    assert body["adapter"] == "alpha"
    assert set(body["scores"]) == {"entailment", "neutral", "contradiction"}
    assert abs(sum(body["scores"].values()) - 1) < 1e-5
    assert body["label"] == max(body["scores"], key=body["scores"].get)


def test_batch_mixes_adapters_in_input_order(client):
    pairs = [
        {"premise": PREMISE, "hypothesis": HYPOTHESIS, "adapter": "beta"},
        {"premise": PREMISE, "hypothesis": HYPOTHESIS},
        {"premise": "Two dogs run.", "hypothesis": "Animals move.", "adapter": "alpha"},
    ]
    response = client.post("/nli/batch", json={"pairs": pairs, "adapter": "beta"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["adapter"] for r in results] == ["beta", "beta", "alpha"]
    assert set(results[0]["scores"]) == {"entailment", "not_entailment"}
    single = nli(client, "beta").json()
    for key, value in single["scores"].items():
        assert abs(results[0]["scores"][key] - value) < 1e-4


def test_unknown_adapter_is_404_naming_the_available(client):
    response = nli(client, "nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "adapter_not_found"
    assert set(response.json()["error"]["details"]["available"]) >= {"alpha", "beta"}
    batch = client.post("/nli/batch", json={"pairs": [{"premise": "a", "hypothesis": "b", "adapter": "nope"}]})
    assert batch.status_code == 404


BAD_BODIES = [
    ("empty premise", "/nli", {"premise": "", "hypothesis": "h"}, "premise"),
    ("blank hypothesis", "/nli", {"premise": "p", "hypothesis": "   "}, "hypothesis"),
    ("over-long premise", "/nli", {"premise": "x" * 201, "hypothesis": "h"}, "premise"),
    ("missing hypothesis", "/nli", {"premise": "p"}, "hypothesis"),
    ("null premise", "/nli", {"premise": None, "hypothesis": "h"}, "premise"),
    ("number premise", "/nli", {"premise": 5, "hypothesis": "h"}, "premise"),
    ("unknown field", "/nli", {"premise": "p", "hypothesis": "h", "extra": 1}, "extra"),
    ("adapter not a string", "/nli", {"premise": "p", "hypothesis": "h", "adapter": ["x"]}, "adapter"),
    ("empty batch", "/nli/batch", {"pairs": []}, "pairs"),
    ("oversized batch", "/nli/batch", {"pairs": [{"premise": "p", "hypothesis": "h"}] * 9}, "pairs"),
    ("pairs not a list", "/nli/batch", {"pairs": "p"}, "pairs"),
    ("blank pair in batch", "/nli/batch", {"pairs": [{"premise": "p", "hypothesis": "h"}, {"premise": " ", "hypothesis": "h"}]}, "pairs[1].premise"),
    ("over-long pair in batch", "/nli/batch", {"pairs": [{"premise": "p", "hypothesis": "h" * 300}]}, "pairs[0].hypothesis"),
]


@pytest.mark.parametrize("path,body,field", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_invalid_input_is_422_naming_the_field(client, path, body, field):
    response = client.post(path, json=body)
    assert response.status_code == 422
    fields = [f["field"] for f in response.json()["error"]["details"]["fields"]]
    assert any(f == field or f.startswith(field) for f in fields), fields


@pytest.mark.parametrize(
    "raw,content_type",
    [(b"{not json", "application/json"), (b"premise=a", "application/x-www-form-urlencoded"), (b"\xff\xfe", "application/json")],
    ids=["broken json", "form body", "invalid utf-8"],
)
def test_malformed_bodies_are_422(client, raw, content_type):
    response = client.post("/nli", content=raw, headers={"content-type": content_type})
    assert response.status_code == 422


def test_list_and_get_adapters(client):
    assert nli(client, "alpha").status_code == 200  # this test's own request: it must not rely on others'
    listing = client.get("/adapters").json()["adapters"]
    by_name = {a["name"]: a for a in listing}
    assert {"alpha", "beta"} <= set(by_name)
    alpha = client.get("/adapters/alpha").json()
    assert alpha["state"] == "ready" and alpha["rank"] == 16 and alpha["target_modules"] == ["query", "value"]
    assert alpha["labels"] == ["entailment", "neutral", "contradiction"]
    assert alpha["size_bytes"] > 0 and alpha["requests"] >= 1 and alpha["resident"] is True
    assert alpha["tier"] == "device" and alpha["version"] >= 1 and alpha["loads"] >= 1
    assert client.get("/adapters/nope").status_code == 404


def test_put_and_delete_from_loopback_without_token(client, adapters_root):
    put = client.put("/adapters/gamma", json={"path": str(adapters_root / "spare" / "gamma")})
    assert put.status_code == 200 and put.json()["state"] == "ready"
    assert nli(client, "gamma").status_code == 200
    relative = client.put("/adapters/gamma2", json={"path": "spare/gamma"})  # relative to adapters_dir
    assert relative.status_code == 200
    assert client.delete("/adapters/gamma").status_code == 200
    assert client.delete("/adapters/gamma2").status_code == 200
    assert nli(client, "gamma").status_code == 404
    assert client.delete("/adapters/gamma").status_code == 404


BAD_LOADS = [
    ("outside the roots", "gamma", "/etc", 403),
    ("dot-dot escape", "gamma", "../../../../etc", 403),
    ("encoded dot-dot is just a name", "gamma", "%2e%2e/%2e%2e", 404),
    ("NUL byte", "gamma", "spare/gamma\x00", 403),
    ("missing directory", "gamma", "spare/nothing-here", 404),
    ("empty directory", "gamma", "spare/gamma-copy", 422),
    ("the root itself", "gamma", ".", 403),
    ("bad name", "Bad..Name", "spare/gamma", 422),
]


@pytest.mark.parametrize("name,path,status", [b[1:] for b in BAD_LOADS], ids=[b[0] for b in BAD_LOADS])
def test_bad_loads_are_refused_and_change_nothing(client, name, path, status):
    def known():
        return {(a["name"], a["state"], a["path"]) for a in client.get("/adapters").json()["adapters"]}

    before = known()
    response = client.put(f"/adapters/{name}", json={"path": path})
    assert response.status_code == status, response.json()
    if response.json()["error"]["code"] == "adapter_invalid":
        # Files that cannot serve leave a trace: the name is known as failed, with the reason.
        [failed] = known() - before
        assert failed[:2] == (name, "failed")
        assert client.get(f"/adapters/{name}").json()["error"]
        assert client.delete(f"/adapters/{name}").status_code == 200
    assert known() == before
    assert nli(client, "alpha").status_code == 200


def test_token_is_required_when_configured(adapters_root):
    settings = settings_for(adapters_root, admin_token="s3cret")
    with TestClient(create_app(settings)) as client:
        path = {"path": str(adapters_root / "spare" / "gamma")}
        assert client.put("/adapters/gamma", json=path).status_code == 401
        assert client.put("/adapters/gamma", json=path, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.put("/adapters/gamma", json=path, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.delete("/adapters/alpha").status_code == 401
        assert client.get("/adapters").status_code == 200  # reading stays open
        ok = client.put("/adapters/gamma", json=path, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.delete("/adapters/gamma", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_no_token_refuses_non_loopback_clients(adapters_root):
    with TestClient(create_app(settings_for(adapters_root)), client=("203.0.113.7", 5000)) as client:
        response = client.put("/adapters/gamma", json={"path": str(adapters_root / "spare" / "gamma")})
        assert response.status_code == 403
        assert client.delete("/adapters/alpha").status_code == 403
        assert nli(client).status_code == 200


def test_readyz_is_503_without_the_default_adapter(adapters_root):
    with TestClient(create_app(settings_for(adapters_root, default_adapter="missing"))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["missing"] == ["nli"]
        assert client.get("/healthz").status_code == 200


def test_swap_under_concurrent_traffic_loses_and_misroutes_nothing(client, adapters_root, embedded_adapters):
    """Traffic to alpha and beta flows while gamma is loaded and unloaded and `swap` is replaced
    between two different adapters; every answer must be the one its adapter gives alone."""
    spare = adapters_root / "spare"
    expected = {name: nli(client, name).json()["scores"] for name in ("alpha", "beta")}
    client.put("/adapters/swap", json={"path": str(adapters_root / "alpha")})
    versions = [expected["alpha"], expected["beta"]]
    stop = threading.Event()
    failures: list[str] = []

    def traffic(name: str) -> int:
        sent = 0
        while not stop.is_set():
            response = nli(client, name)
            sent += 1
            if response.status_code != 200:
                failures.append(f"{name}: {response.status_code}")
                continue
            scores = response.json()["scores"]
            candidates = versions if name == "swap" else [expected[name]]
            if not any(_close(scores, c) for c in candidates):
                failures.append(f"{name}: wrong scores {scores}")
        return sent

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(traffic, n) for n in ("alpha", "beta", "alpha", "beta")]
        try:
            for i in range(6):
                source = adapters_root / ("beta" if i % 2 == 0 else "alpha")
                assert client.put("/adapters/swap", json={"path": str(source)}).status_code == 200
                assert client.put("/adapters/gamma", json={"path": str(spare / "gamma")}).status_code == 200
                assert nli(client, "gamma").status_code == 200
                assert client.delete("/adapters/gamma").status_code == 200
            futures.append(pool.submit(traffic, "swap"))
            for i in range(4):
                source = adapters_root / ("alpha" if i % 2 == 0 else "beta")
                assert client.put("/adapters/swap", json={"path": str(source)}).status_code == 200
        finally:
            stop.set()  # a failed step must not leave the traffic threads running forever
        sent = sum(f.result() for f in futures)
    client.delete("/adapters/swap")
    assert failures == []
    assert sent > 0


def _close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in got)
