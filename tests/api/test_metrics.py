"""GET /metrics exposes request, adapter, batch and queue series after real traffic, with the adapter
label bounded by LORASWAP_METRICS_MAX_ADAPTERS through PUT and DELETE."""

from __future__ import annotations

import re
import shutil

from fastapi.testclient import TestClient

from app.config import Settings
from app.inference.heap import glibc_malloc_trim
from app.main import create_app


def value(text: str, series: str) -> float:
    match = re.search(r"^" + re.escape(series) + r" ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def test_metrics_after_traffic(embedded_adapters):
    settings = Settings(fraud_enabled=False, adapters_dir=embedded_adapters, default_adapter="alpha")
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            assert client.post("/nli", json={"premise": "a b", "hypothesis": "c"}).status_code == 200
        assert client.post("/nli", json={"premise": "a", "hypothesis": "b", "adapter": "nope"}).status_code == 404
        assert client.get("/adapters/nope").status_code == 404
        text = client.get("/metrics").text
    assert value(text, 'loraswap_nli_pairs_total{adapter="alpha",outcome="ok"}') == 3
    assert value(text, "loraswap_batch_size_pairs_count") >= 1
    assert value(text, "loraswap_batch_size_pairs_sum") == 3
    assert value(text, "loraswap_queue_wait_seconds_count") == 3
    assert value(text, 'loraswap_http_requests_total{method="POST",route="/nli",status="200"}') == 3
    assert value(text, 'loraswap_http_requests_total{method="POST",route="/nli",status="404"}') == 1
    # The route template, never the raw path, labels a request.
    assert value(text, 'loraswap_http_requests_total{method="GET",route="/adapters/{name}",status="404"}') == 1
    assert value(text, "loraswap_queue_depth_pairs") == 0
    assert value(text, "loraswap_resident_adapters") >= 1
    if glibc_malloc_trim() is not None:  # trimming on by default where glibc has malloc_trim
        assert value(text, "loraswap_heap_trims_total") >= 0
        assert value(text, "loraswap_heap_trimmed_bytes_total") >= 0


def test_heap_series_are_absent_with_trimming_off(embedded_adapters):
    settings = Settings(fraud_enabled=False, adapters_dir=embedded_adapters, default_adapter="alpha", heap_trim_mb=0)
    with TestClient(create_app(settings)) as client:
        assert client.post("/nli", json={"premise": "a b", "hypothesis": "c"}).status_code == 200
        text = client.get("/metrics").text
    assert "loraswap_heap_trims" not in text
    assert "loraswap_nli_pairs_total" in text


def adapter_labels(text: str) -> set[str]:
    series = r'^loraswap_nli_(?:pairs_total|request_seconds_count)\{adapter="([^"]+)"'
    return set(re.findall(series, text, re.MULTILINE))


def pairs_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^loraswap_nli_pairs_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def test_adapters_past_the_limit_share_other_and_a_delete_frees_a_place(embedded_adapters, tmp_path):
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(embedded_adapters / name, tmp_path / name)
    settings = Settings(
        fraud_enabled=False, adapters_dir=tmp_path, default_adapter="alpha", max_batch_wait_ms=1, metrics_max_adapters=2
    )
    pair = {"premise": "a b", "hypothesis": "c"}
    with TestClient(create_app(settings)) as client:
        assert client.post("/nli", json=pair).status_code == 200  # alpha, the default
        batch = [{**pair, "adapter": a} for a in ("beta", "gamma", "gamma", "alpha")]
        assert client.post("/nli/batch", json={"pairs": batch}).status_code == 200
        assert client.post("/nli", json={**pair, "adapter": "gamma"}).status_code == 200
        text = client.get("/metrics").text
        assert adapter_labels(text) == {"alpha", "beta", "_other"}
        assert value(text, 'loraswap_nli_pairs_total{adapter="alpha",outcome="ok"}') == 2
        assert value(text, 'loraswap_nli_pairs_total{adapter="beta",outcome="ok"}') == 1
        assert value(text, 'loraswap_nli_pairs_total{adapter="_other",outcome="ok"}') == 3  # gamma's
        assert pairs_total(text) == 6
        assert value(text, 'loraswap_nli_request_seconds_count{adapter="_other"}') == 2

        # A PUT over a name keeps its series; a DELETE removes them and frees the place.
        put = client.put("/adapters/alpha", json={"path": str(tmp_path / "alpha")})
        assert put.status_code == 200 and put.json()["version"] == 2
        assert client.delete("/adapters/beta").status_code == 200
        text = client.get("/metrics").text
        assert adapter_labels(text) == {"alpha", "_other"}
        assert value(text, 'loraswap_nli_pairs_total{adapter="alpha",outcome="ok"}') == 2

        assert client.post("/nli", json={**pair, "adapter": "gamma"}).status_code == 200  # takes beta's place
        text = client.get("/metrics").text
        assert adapter_labels(text) == {"alpha", "gamma", "_other"}
        assert value(text, 'loraswap_nli_pairs_total{adapter="gamma",outcome="ok"}') == 1
        assert value(text, 'loraswap_nli_pairs_total{adapter="_other",outcome="ok"}') == 3


def test_with_no_places_every_adapter_is_other(embedded_adapters):
    settings = Settings(
        fraud_enabled=False, adapters_dir=embedded_adapters, default_adapter="alpha", metrics_max_adapters=0
    )
    with TestClient(create_app(settings)) as client:
        batch = [{"premise": "a b", "hypothesis": "c", "adapter": a} for a in ("alpha", "beta", "beta")]
        assert client.post("/nli/batch", json={"pairs": batch}).status_code == 200
        text = client.get("/metrics").text
    assert adapter_labels(text) == {"_other"}
    assert value(text, 'loraswap_nli_pairs_total{adapter="_other",outcome="ok"}') == 3
    # Latency counts once per adapter of a request, as when each has its own series: alpha's and beta's.
    assert value(text, 'loraswap_nli_request_seconds_count{adapter="_other"}') == 2


def test_requests_that_never_reach_a_route_are_labelled_by_the_path_they_belong_to(embedded_adapters):
    settings = Settings(fraud_enabled=False, adapters_dir=embedded_adapters, default_adapter="alpha", max_request_bytes=1024)
    with TestClient(create_app(settings)) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/static/favicon.svg").status_code == 200
        too_big = client.post("/nli", content=b"x" * 4096, headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert client.get("/nli/no/such/thing").status_code == 404
        text = client.get("/metrics").text
    assert value(text, 'loraswap_http_requests_total{method="GET",route="/openapi.json",status="200"}') == 1
    assert value(text, 'loraswap_http_requests_total{method="GET",route="/static/{path:path}",status="200"}') == 1
    assert value(text, 'loraswap_http_requests_total{method="POST",route="/nli",status="413"}') == 1
    assert value(text, 'loraswap_http_requests_total{method="GET",route="unmatched",status="404"}') == 1


def test_opentelemetry_is_asked_per_request_only_when_turned_on(monkeypatch):
    """FastAPI's native OpenTelemetry checks the global providers on every request; off by default."""
    from opentelemetry import trace

    asked = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: asked.append(1) or real())
    for enabled, expect_asked in ((False, False), (True, True)):
        asked.clear()
        settings = Settings(fraud_enabled=False, nli_enabled=False, opentelemetry=enabled)
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
        assert bool(asked) is expect_asked
