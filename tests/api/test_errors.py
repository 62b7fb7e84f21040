"""The 422 bodies a new user meets: a long list of missing fields says how many more there are, a body
field called `path` is named `path`, and a body not sent as JSON says that a JSON body is expected."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


@pytest.fixture(scope="module")
def client(embedded_adapters):
    with TestClient(create_app(Settings(adapters_dir=embedded_adapters, default_adapter="alpha"))) as test_client:
        yield test_client


def test_missing_fields_beyond_ten_are_counted(client):
    response = client.post("/fraud", json={"Time": 1.0})
    assert response.status_code == 422
    error = response.json()["error"]
    assert len(error["details"]["fields"]) == 29
    assert error["message"].endswith(" and 19 more")
    assert error["message"].count(",") == 9  # ten names listed


def test_a_body_field_called_path_is_named_path(client):
    response = client.put("/adapters/x", json={"path": 5})
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["error"]["details"]["fields"]] == ["path"]


@pytest.mark.parametrize("headers", [{"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}])
def test_a_body_not_sent_as_json_says_json_is_expected(client, headers):
    response = client.post("/nli", content=b'{"premise": "a", "hypothesis": "b"}', headers=headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "application/json" in error["message"]
    assert error["details"]["fields"] == [
        {"field": "body", "type": "content_type", "message": "expected a JSON body with Content-Type: application/json"}
    ]


def test_405_names_every_method_served_at_the_path(client):
    response = client.delete("/nli")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
