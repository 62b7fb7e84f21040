"""GET /info: the base, its dtype and device, adapter counts, limits and version, as the running app has them."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_info_describes_the_loaded_base_adapters_and_limits(embedded_adapters):
    settings = Settings(adapters_dir=embedded_adapters, default_adapter="alpha", fraud_enabled=False, max_pairs_per_request=7)
    with TestClient(create_app(settings)) as client:
        body = client.get("/info").json()
        listed = client.get("/adapters").json()["adapters"]
    assert body["version"] == "0.1.0"
    assert body["base"] | {"fingerprint": None} == {
        "name": "embedded",
        "loaded": True,
        "model_type": "bert",
        "fingerprint": None,
        "dtype": "float32",
        "device": "cpu",
    }
    assert body["base"]["fingerprint"].startswith("sha256:")
    assert body["adapters"] == {
        "known": len(listed),
        "ready": sum(a["state"] != "failed" for a in listed),  # known on disk serves too (loads on first use)
        "by_tier": {tier: sum(a["tier"] == tier for a in listed) for tier in ("disk", "host", "device")},
        "default": "alpha",
    }
    assert body["adapters"]["ready"] == 3
    assert body["fraud"] == {"enabled": False, "ready": False}
    assert body["limits"]["max_pairs_per_request"] == 7
    assert body["limits"]["max_request_bytes"] == settings.max_request_bytes
    assert "open-inference-protocol-v2" in body["protocols"]


def test_info_without_nli_says_the_base_is_not_loaded():
    with TestClient(create_app(Settings(nli_enabled=False, fraud_enabled=False))) as client:
        body = client.get("/info").json()
    assert body["base"]["loaded"] is False and body["base"]["device"] is None
    assert body["adapters"]["known"] == 0
