"""The fraud API through the real app and the shipped model: scores, every 422 case, and a model that is not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.inference.fraud_scorer import INPUT_FIELDS, FraudScorer
from app.main import create_app
from app.schemas.fraud import FraudRequest
from training.fraud_data import load_transactions

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "fraud"
SLICE = REPO / "data" / "fraud" / "creditcard_slice.csv.gz"
MAX_BATCH = 8


def app_for(model_dir: Path, **overrides) -> TestClient:
    return TestClient(create_app(Settings(nli_enabled=False, fraud_model_dir=model_dir, **overrides)))


@pytest.fixture(scope="module")
def client():
    with app_for(SHIPPED, fraud_max_batch_transactions=MAX_BATCH) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def scorer() -> FraudScorer:
    return FraudScorer.load(SHIPPED)


@pytest.fixture(scope="module")
def transactions() -> list[dict[str, float]]:
    """Real rows of the slice: its first 4 frauds, then 4 normal rows."""
    data = load_transactions(SLICE)
    frauds = [i for i, label in enumerate(data.y) if label == 1][:4]
    normals = [i for i, label in enumerate(data.y) if label == 0][:4]
    return [dict(zip(INPUT_FIELDS, map(float, data.X[i]), strict=True)) for i in frauds + normals]


def fields_named(response) -> list[str]:
    return [item["field"] for item in response.json()["error"]["details"]["fields"]]


# --- happy paths -------------------------------------------------------------------------------


def test_schema_takes_exactly_the_30_fields():
    assert tuple(FraudRequest.model_fields) == INPUT_FIELDS


def test_single_transaction_matches_the_scorer(client, scorer, transactions):
    for transaction in transactions:
        response = client.post("/fraud", json=transaction)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"fraud_probability", "is_fraud", "threshold", "model_version"}
        assert body["fraud_probability"] == scorer.score([transaction])[0]
        assert body["is_fraud"] == (body["fraud_probability"] >= scorer.threshold)
        assert (body["threshold"], body["model_version"]) == (scorer.threshold, scorer.model_version)


def test_frauds_and_normals_get_told_apart(client, transactions):
    verdicts = [client.post("/fraud", json=t).json()["is_fraud"] for t in transactions]
    assert sum(verdicts[:4]) >= 3 and sum(verdicts[4:]) == 0


def test_batch_keeps_input_order_and_matches_the_scorer(client, scorer, transactions):
    for batch in (transactions, transactions[::-1], transactions[3:5]):
        response = client.post("/fraud/batch", json={"transactions": batch})
        assert response.status_code == 200
        body = response.json()
        assert [r["fraud_probability"] for r in body["results"]] == scorer.score(batch)
        assert [r["is_fraud"] for r in body["results"]] == [p >= scorer.threshold for p in scorer.score(batch)]
        assert (body["threshold"], body["model_version"]) == (scorer.threshold, scorer.model_version)


def test_batch_of_exactly_the_limit_is_accepted(client, transactions):
    response = client.post("/fraud/batch", json={"transactions": transactions[:MAX_BATCH]})
    assert response.status_code == 200 and len(response.json()["results"]) == MAX_BATCH


def test_integers_are_numbers_too(client, transactions):
    response = client.post("/fraud", json={**transactions[0], "Time": 0, "Amount": 12})
    assert response.status_code == 200


def test_openapi_documents_the_error_answers(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/fraud", "/fraud/batch"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "422", "503"} <= set(responses)
        assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


# --- every 422 ---------------------------------------------------------------------------------

RAW = "__raw__"  # placeholder swapped for a literal JSON cannot carry through json.dumps (NaN, Infinity, 1e309)


def _one(transaction: dict, field: str, value) -> dict:
    return {**transaction, field: value}


def _without(transaction: dict, field: str) -> dict:
    return {k: v for k, v in transaction.items() if k != field}


def _raw(body, literal: str) -> str:
    return json.dumps(body).replace(json.dumps(RAW), literal)


# (id, build(transaction) -> JSON-able body or raw text, field the 422 must name)
SINGLE_CASES = [
    ("missing field", lambda t: _without(t, "V3"), "V3"),
    ("unknown field", lambda t: {**t, "V29": 1.0}, "V29"),
    ("null", lambda t: _one(t, "Amount", None), "Amount"),
    ("numeric string", lambda t: _one(t, "V1", "1.5"), "V1"),
    ("word", lambda t: _one(t, "V2", "high"), "V2"),
    ("true", lambda t: _one(t, "V7", True), "V7"),
    ("false", lambda t: _one(t, "V8", False), "V8"),
    ("list", lambda t: _one(t, "V9", [1.0]), "V9"),
    ("object", lambda t: _one(t, "V10", {"x": 1}), "V10"),
    ("NaN literal", lambda t: _raw(_one(t, "V4", RAW), "NaN"), "V4"),
    ("Infinity literal", lambda t: _raw(_one(t, "V5", RAW), "Infinity"), "V5"),
    ("-Infinity literal", lambda t: _raw(_one(t, "V6", RAW), "-Infinity"), "V6"),
    ("1e309 overflows to infinity", lambda t: _raw(_one(t, "Amount", RAW), "1e309"), "Amount"),
    ("-1e309", lambda t: _raw(_one(t, "V11", RAW), "-1e309"), "V11"),
    ("negative Amount", lambda t: _one(t, "Amount", -0.01), "Amount"),
    ("negative Time", lambda t: _one(t, "Time", -1), "Time"),
    ("body is a list", lambda t: [t], "body"),
    ("body is a number", lambda t: 3, "body"),
]


def _post(client, path: str, body):
    if isinstance(body, str):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def _assert_422_naming(response, field: str) -> None:
    assert response.status_code == 422
    body = json.loads(response.text)  # strict JSON: a NaN in the error body would not even get here
    assert body["error"]["code"] == "invalid_input"
    assert field in fields_named(response)
    for item in body["error"]["details"]["fields"]:
        assert set(item) == {"field", "type", "message"}  # the offending input is never echoed
    assert "NaN" not in response.text and "Infinity" not in response.text


@pytest.mark.parametrize("build, field", [(b, f) for _, b, f in SINGLE_CASES], ids=[n for n, _, _ in SINGLE_CASES])
def test_single_rejects(client, transactions, build, field):
    _assert_422_naming(_post(client, "/fraud", build(transactions[0])), field)


@pytest.mark.parametrize("build, field", [(b, f) for _, b, f in SINGLE_CASES], ids=[n for n, _, _ in SINGLE_CASES])
def test_batch_rejects_the_same_inside_an_item(client, transactions, build, field):
    item = build(transactions[0])
    if isinstance(item, str):
        body = '{"transactions": [' + json.dumps(transactions[1]) + ", " + item + "]}"
    else:
        body = {"transactions": [transactions[1], item]}
    expected = "transactions[1]" if field == "body" else f"transactions[1].{field}"
    _assert_422_naming(_post(client, "/fraud/batch", body), expected)


BATCH_CASES = [
    ("empty batch", lambda ts: {"transactions": []}, "transactions"),
    ("one over the limit", lambda ts: {"transactions": (ts * 2)[: MAX_BATCH + 1]}, "transactions"),
    ("far over the limit", lambda ts: {"transactions": ts * 50}, "transactions"),
    ("transactions missing", lambda ts: {}, "transactions"),
    ("transactions null", lambda ts: {"transactions": None}, "transactions"),
    ("transactions an object", lambda ts: {"transactions": ts[0]}, "transactions"),
    ("transactions a string", lambda ts: {"transactions": "all of them"}, "transactions"),
    ("transactions a number", lambda ts: {"transactions": 3}, "transactions"),
    ("item not an object", lambda ts: {"transactions": [ts[0], 1]}, "transactions[1]"),
    ("unknown top-level field", lambda ts: {"transactions": ts[:1], "priority": "high"}, "priority"),
    ("third item bad", lambda ts: {"transactions": [ts[0], ts[1], _without(ts[2], "Amount")]}, "transactions[2].Amount"),
]


@pytest.mark.parametrize("build, field", [(b, f) for _, b, f in BATCH_CASES], ids=[n for n, _, _ in BATCH_CASES])
def test_batch_rejects(client, transactions, build, field):
    _assert_422_naming(_post(client, "/fraud/batch", build(transactions)), field)


@pytest.mark.parametrize("path", ["/fraud", "/fraud/batch"])
@pytest.mark.parametrize(
    "text, kind",
    [('{"Time": 1,', "json_invalid"), ("not json", "json_invalid"), ("", "missing")],
    ids=["truncated", "words", "empty"],
)
def test_body_that_is_not_json_is_422(client, path, text, kind):
    response = client.post(path, content=text, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"
    assert [item["type"] for item in response.json()["error"]["details"]["fields"]] == [kind]


# --- no model ----------------------------------------------------------------------------------


def _flip_byte(directory: Path) -> None:
    artifact = directory / json.loads((directory / "manifest.json").read_text())["artifact"]["file"]
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    "prepare",
    [_flip_byte, lambda d: shutil.rmtree(d), lambda d: (d / "manifest.json").unlink()],
    ids=["tampered artifact", "missing model dir", "missing manifest"],
)
def test_unservable_model_answers_503_while_the_rest_works(tmp_path, transactions, prepare):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    prepare(directory)
    with app_for(directory) as broken:
        ready = broken.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["missing"] == ["fraud"]
        reason = next(c["reason"] for c in ready.json()["components"] if c["name"] == "fraud")
        assert reason and str(directory) in reason
        for path, body in (("/fraud", transactions[0]), ("/fraud/batch", {"transactions": transactions[:2]})):
            response = broken.post(path, json=body)
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert response.json()["error"]["code"] == "not_ready"
            assert response.json()["error"]["details"]["component"] == "fraud"
        assert broken.get("/healthz").status_code == 200


def test_tampered_artifact_is_refused_as_a_checksum_mismatch(tmp_path, transactions):
    from app.inference.fraud_scorer import FraudModelError

    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    artifact = directory / json.loads((directory / "manifest.json").read_text())["artifact"]["file"]
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))
    with pytest.raises(FraudModelError) as excinfo:
        FraudScorer.load(directory)
    assert excinfo.value.code == "checksum_mismatch"
    with app_for(directory) as broken:
        response = broken.post("/fraud", json=transactions[0])
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"
        assert response.json()["error"]["details"]["component"] == "fraud"
        assert broken.get("/readyz").json()["missing"] == ["fraud"]


def test_fraud_disabled_answers_503(transactions):
    with app_for(SHIPPED, fraud_enabled=False) as disabled:
        assert disabled.post("/fraud", json=transactions[0]).status_code == 503

