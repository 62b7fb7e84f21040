"""Access logs are JSON lines with the request id (taken from the client or generated) and no body."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from app.config import Settings
from app.logs import JsonFormatter
from app.main import create_app


def test_request_id_is_echoed_and_logged_without_the_body(embedded_adapters, caplog):
    settings = Settings(fraud_enabled=False, adapters_dir=embedded_adapters, default_adapter="alpha")
    with TestClient(create_app(settings)) as client, caplog.at_level(logging.INFO, logger="loraswap.access"):
        given = client.post("/nli", json={"premise": "secret premise", "hypothesis": "h"}, headers={"X-Request-ID": "abc-123"})
        generated = client.get("/healthz")
    assert given.headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) == 32
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "loraswap.access"]
    nli_line = next(line for line in lines if line["route"] == "/nli")
    assert nli_line["request_id"] == "abc-123"
    assert nli_line["status"] == 200 and nli_line["adapter"] == "alpha" and nli_line["latency_ms"] >= 0
    assert "secret premise" not in json.dumps(lines)
