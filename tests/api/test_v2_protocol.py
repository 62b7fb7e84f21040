"""The Open Inference Protocol v2 routes through the real app (embedded base, synthetic adapters, the
shipped fraud model): metadata, health, inference with JSON and hand-built binary tensors equal to the
native routes' answers, every malformed request a 4xx in the protocol's error shape, and the model
repository on the same registry and authorisation as /adapters."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.reliability.conftest import asgi_call, settings_for

PREMISES = ["A man is playing a guitar on stage.", "Two dogs run in a park.", "The café is closed."]
HYPOTHESES = ["A person is making music.", "Animals are moving.", "The café is open."]
FEATURES = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount"]
# Two transactions: a quiet one and one far from the data (both valid: within the API's bounds).
TRANSACTIONS = [
    [10.0] + [0.1] * 28 + [12.5],
    [50_000.0] + [-3.0, 4.0, -6.0, 5.0] * 7 + [900.0],
]


@pytest.fixture(scope="module")
def adapters_root(embedded_adapters, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(embedded_adapters / name, root / name)
    shutil.copytree(embedded_adapters / "gamma", root / "spare" / "delta")  # loadable, not discovered
    return root


@pytest.fixture(scope="module")
def client(adapters_root):
    with TestClient(create_app(settings_for(adapters_root))) as test_client:
        yield test_client


def nli_request(premises=PREMISES, hypotheses=HYPOTHESES, **extra) -> dict:
    return {
        "inputs": [
            {"name": "premise", "shape": [len(premises)], "datatype": "BYTES", "data": premises},
            {"name": "hypothesis", "shape": [len(hypotheses)], "datatype": "BYTES", "data": hypotheses},
        ],
        **extra,
    }


def fraud_request(rows=TRANSACTIONS, datatype="FP32") -> dict:
    return {"inputs": [{"name": "features", "shape": [len(rows), 30], "datatype": datatype, "data": rows}]}


def outputs_of(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


# -- binary tensor data, built by hand from the extension's definition -----------------------------------


def bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def binary_body(header: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def split_binary_response(response) -> tuple[dict, dict[str, bytes]]:
    size = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:size])
    blobs, offset = {}, size
    for output in header["outputs"]:
        length = output.get("parameters", {}).get("binary_data_size")
        if length is not None:
            blobs[output["name"]] = response.content[offset : offset + length]
            offset += length
    assert offset == len(response.content)
    return header, blobs


def parse_bytes_tensor(raw: bytes) -> list[str]:
    values, position = [], 0
    while position < len(raw):
        (length,) = struct.unpack_from("<I", raw, position)
        values.append(raw[position + 4 : position + 4 + length].decode())
        position += 4 + length
    return values


# -- health and metadata --------------------------------------------------------------------------------


def test_server_metadata_and_health(client):
    metadata = client.get("/v2")
    assert metadata.status_code == 200
    body = metadata.json()
    assert body["name"] == "loraswap" and body["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(body["extensions"])
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for name in ("alpha", "fraud"):
        response = client.get(f"/v2/models/{name}/ready")
        assert response.status_code == 200 and response.json() == {"name": name, "ready": True}


def test_model_metadata_names_tensors_and_label_order(client):
    alpha = client.get("/v2/models/alpha").json()
    assert alpha["name"] == "alpha"
    assert alpha["inputs"] == [
        {"name": "premise", "datatype": "BYTES", "shape": [-1]},
        {"name": "hypothesis", "datatype": "BYTES", "shape": [-1]},
    ]
    assert alpha["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert alpha["parameters"]["labels"] == client.get("/adapters/alpha").json()["labels"]
    beta = client.get("/v2/models/beta").json()
    assert beta["parameters"]["labels"] == ["entailment", "not_entailment"]
    assert beta["outputs"][1]["shape"] == [-1, 2]
    fraud = client.get("/v2/models/fraud").json()
    assert fraud["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert fraud["outputs"] == [
        {"name": "fraud_probability", "datatype": "FP32", "shape": [-1]},
        {"name": "is_fraud", "datatype": "BOOL", "shape": [-1]},
    ]
    assert fraud["parameters"]["features"] == FEATURES


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready"])
def test_unknown_model_is_404_in_the_protocols_shape(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"error"} and "nope" in response.json()["error"]


# -- inference --------------------------------------------------------------------------------------------


def test_nli_json_inference_equals_the_native_batch(client):
    response = client.post("/v2/models/alpha/infer", json=nli_request(id="req-1"))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == "alpha" and body["id"] == "req-1"
    outputs = outputs_of(body)
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [3]
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [3, 3]
    native = client.post(
        "/nli/batch",
        json={"pairs": [{"premise": p, "hypothesis": h} for p, h in zip(PREMISES, HYPOTHESES)], "adapter": "alpha"},
    ).json()["results"]
    labels = client.get("/v2/models/alpha").json()["parameters"]["labels"]
    probabilities = outputs["probabilities"]["data"]
    for row, result in enumerate(native):
        assert outputs["label"]["data"][row] == result["label"]
        for column, label in enumerate(labels):
            assert probabilities[row * 3 + column] == pytest.approx(result["scores"][label], abs=1e-6)


def test_nli_binary_inference_equals_json(client):
    want = outputs_of(client.post("/v2/models/beta/infer", json=nli_request()).json())
    header = {
        "inputs": [
            {"name": "premise", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(bytes_tensor(PREMISES))}},
            {"name": "hypothesis", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(bytes_tensor(HYPOTHESES))}},
        ],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(header, [bytes_tensor(PREMISES), bytes_tensor(HYPOTHESES)])
    response = client.post("/v2/models/beta/infer", content=body, headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    head, blobs = split_binary_response(response)
    assert all("data" not in o for o in head["outputs"])
    assert parse_bytes_tensor(blobs["label"]) == want["label"]["data"]
    probabilities = struct.unpack(f"<{len(blobs['probabilities']) // 4}f", blobs["probabilities"])
    assert probabilities == pytest.approx(want["probabilities"]["data"], abs=1e-6)


def test_requested_outputs_and_per_output_binary(client):
    only_label = client.post("/v2/models/alpha/infer", json=nli_request(outputs=[{"name": "label"}]))
    assert [o["name"] for o in only_label.json()["outputs"]] == ["label"]
    mixed = client.post(
        "/v2/models/alpha/infer",
        json=nli_request(outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}]),
    )
    head, blobs = split_binary_response(mixed)
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "label"]
    assert set(blobs) == {"probabilities"} and len(blobs["probabilities"]) == 3 * 3 * 4
    assert len(head["outputs"][1]["data"]) == 3


def test_fraud_inference_equals_the_native_batch_json_and_binary(client):
    native = client.post(
        "/fraud/batch", json={"transactions": [dict(zip(FEATURES, row)) for row in TRANSACTIONS]}
    ).json()
    response = client.post("/v2/models/fraud/infer", json=fraud_request())
    assert response.status_code == 200
    outputs = outputs_of(response.json())
    assert outputs["fraud_probability"]["shape"] == [2] and outputs["is_fraud"]["datatype"] == "BOOL"
    assert outputs["is_fraud"]["data"] == [r["is_fraud"] for r in native["results"]]
    assert outputs["fraud_probability"]["data"] == pytest.approx([r["fraud_probability"] for r in native["results"]])
    assert response.json()["parameters"]["model_version"] == native["model_version"]

    flat = [v for row in TRANSACTIONS for v in row]
    raw = struct.pack(f"<{len(flat)}d", *flat)
    header = {
        "inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP64", "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "fraud_probability", "parameters": {"binary_data": True}}, {"name": "is_fraud", "parameters": {"binary_data": True}}],
    }
    body, headers = binary_body(header, [raw])
    head, blobs = split_binary_response(client.post("/v2/models/fraud/infer", content=body, headers=headers))
    assert struct.unpack("<2f", blobs["fraud_probability"]) == pytest.approx(outputs["fraud_probability"]["data"], rel=1e-6)
    assert list(blobs["is_fraud"]) == [int(v) for v in outputs["is_fraud"]["data"]]


def _binary(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    return binary_body(header, list(blobs))


def _premise_binary(raw: bytes, size: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {"name": "premise", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw) if size is None else size}},
            {"name": "hypothesis", "shape": [1], "datatype": "BYTES", "data": ["h"]},
        ]
    }
    return _binary(header, raw)


def _features_binary(values: list[float]) -> tuple[bytes, dict[str, str]]:
    raw = struct.pack(f"<{len(values)}f", *values)
    header = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}]}
    return _binary(header, raw)


def _json(body) -> tuple[bytes, dict[str, str]]:
    return json.dumps(body).encode(), {"content-type": "application/json"}


def _raw_fraud(literal: str) -> tuple[bytes, dict[str, str]]:
    # A JSON literal Python's json module would not write (NaN, Infinity, 1e309) in the first feature.
    zeros = ", ".join(["0"] * 29)
    text = f'{{"inputs": [{{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [{literal}, {zeros}]}}]}}'
    return text.encode(), {"content-type": "application/json"}


ONE_ROW = [[1.0] * 30]
BAD_REQUESTS = [
    # (id, model, (body, headers), status)
    ("not json", "alpha", (b"{not json", {"content-type": "application/json"}), 422),
    ("empty body", "alpha", (b"", {}), 422),
    ("no inputs", "alpha", _json({"inputs": []}), 422),
    ("unknown top-level field", "alpha", _json({**nli_request(), "extra": 1}), 422),
    ("unknown model", "nope", _json(nli_request()), 404),
    ("premise as FP32", "alpha", _json({"inputs": [{"name": "premise", "shape": [1], "datatype": "FP32", "data": [1.0]}, nli_request()["inputs"][1]]}), 422),
    ("hypothesis missing", "alpha", _json({"inputs": nli_request()["inputs"][:1]}), 422),
    ("unknown input", "alpha", _json({"inputs": [*nli_request()["inputs"], {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}), 422),
    ("duplicate input", "alpha", _json({"inputs": [nli_request()["inputs"][0]] * 2}), 422),
    ("shape and data disagree", "alpha", _json({"inputs": [{**nli_request()["inputs"][0], "shape": [2]}, nli_request()["inputs"][1]]}), 422),
    ("premises and hypotheses differ", "alpha", _json(nli_request(PREMISES, HYPOTHESES[:2])), 422),
    ("two-dimensional text", "alpha", _json({"inputs": [{"name": n, "shape": [1, 1], "datatype": "BYTES", "data": [["t"]]} for n in ("premise", "hypothesis")]}), 422),
    ("number as BYTES element", "alpha", _json(nli_request([5], ["h"])), 422),
    ("blank premise", "alpha", _json(nli_request([" "], ["h"])), 422),
    ("over-long premise", "alpha", _json(nli_request(["x" * 201], ["h"])), 422),
    ("more pairs than allowed", "alpha", _json(nli_request(["p"] * 9, ["h"] * 9)), 422),
    ("unknown requested output", "alpha", _json(nli_request(outputs=[{"name": "logits"}])), 422),
    ("classification extension", "alpha", _json(nli_request(outputs=[{"name": "label", "parameters": {"classification": 2}}])), 422),
    ("binary_data not a bool", "alpha", _json(nli_request(parameters={"binary_data_output": "yes"})), 422),
    ("parameter value an object", "alpha", _json(nli_request(parameters={"x": {"y": 1}})), 422),
    ("negative dimension", "alpha", _json({"inputs": [{**nli_request()["inputs"][0], "shape": [-1]}, nli_request()["inputs"][1]]}), 422),
    ("shape as strings", "alpha", _json({"inputs": [{**nli_request()["inputs"][0], "shape": ["3"]}, nli_request()["inputs"][1]]}), 422),
    ("datatype unknown", "alpha", _json({"inputs": [{**nli_request()["inputs"][0], "datatype": "STRING"}, nli_request()["inputs"][1]]}), 422),
    ("header length not a number", "alpha", (b"{}", {"Inference-Header-Content-Length": "abc"}), 422),
    ("header length zero", "alpha", (b"{}", {"Inference-Header-Content-Length": "0"}), 422),
    ("header length past the body", "alpha", (b"{}", {"Inference-Header-Content-Length": "99"}), 422),
    ("binary size past the body", "alpha", _premise_binary(bytes_tensor(["p"]), size=50), 422),
    ("bytes after the tensors", "alpha", _binary({"inputs": nli_request(["p"], ["h"])["inputs"]}, b"junk"), 422),
    ("cut length prefix", "alpha", _premise_binary(b"\x05\x00"), 422),
    ("element past its tensor", "alpha", _premise_binary(b"\x09\x00\x00\x00abc"), 422),
    ("invalid UTF-8", "alpha", _premise_binary(b"\x02\x00\x00\x00\xff\xfe"), 422),
    ("both data and binary", "alpha", _binary({"inputs": [{**nli_request(["p"], ["h"])["inputs"][0], "parameters": {"binary_data_size": 5}}, nli_request(["p"], ["h"])["inputs"][1]]}, bytes_tensor(["p"])), 422),
    ("shared memory", "alpha", _json({"inputs": [{**nli_request()["inputs"][0], "parameters": {"shared_memory_region": "r"}}, nli_request()["inputs"][1]]}), 422),
    ("fraud NaN literal", "fraud", _raw_fraud("NaN"), 422),
    ("fraud Infinity literal", "fraud", _raw_fraud("-Infinity"), 422),
    ("fraud 1e309", "fraud", _raw_fraud("1e309"), 422),
    ("fraud beyond FP32", "fraud", _raw_fraud("1e39"), 422),
    ("fraud beyond the API's bound", "fraud", _raw_fraud("1e12"), 422),
    ("fraud negative Time", "fraud", _raw_fraud("-1"), 422),
    ("fraud string element", "fraud", _raw_fraud('"1"'), 422),
    ("fraud bool element", "fraud", _raw_fraud("true"), 422),
    ("fraud binary NaN", "fraud", _features_binary([math.nan] + [0.0] * 29), 422),
    ("fraud binary infinity", "fraud", _features_binary([0.0] * 29 + [math.inf]), 422),
    ("fraud 29 columns", "fraud", _json({"inputs": [{"name": "features", "shape": [1, 29], "datatype": "FP32", "data": [0.0] * 29}]}), 422),
    ("fraud flat shape", "fraud", _json({"inputs": [{"name": "features", "shape": [30], "datatype": "FP32", "data": [0.0] * 30}]}), 422),
    ("fraud BYTES features", "fraud", _json({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "BYTES", "data": ["0"] * 30}]}), 422),
    ("fraud over the batch limit", "fraud", _json(fraud_request(ONE_ROW * 17)), 422),
]


@pytest.mark.parametrize("model,request_,status", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_4xx_in_the_protocols_shape(client, model, request_, status):
    body, headers = request_
    response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


def test_the_server_keeps_serving_after_bad_requests(client):
    for _, model, (body, headers), _ in BAD_REQUESTS:
        client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v2/models/alpha/infer", json=nli_request()).status_code == 200
    assert client.post("/v2/models/fraud/infer", json=fraud_request()).status_code == 200


def test_protocol_errors_stay_under_v2(client):
    unknown_route = client.get("/v2/no/such/route")
    assert unknown_route.status_code == 404 and set(unknown_route.json()) == {"error"}
    wrong_method = client.get("/v2/models/alpha/infer")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}
    assert "POST" in wrong_method.headers["allow"]
    native = client.post("/nli", json={"premise": "", "hypothesis": "h"})
    assert native.status_code == 422 and native.json()["error"]["code"] == "invalid_input"


# -- model repository ------------------------------------------------------------------------------------


def index(client, body=None) -> dict[str, dict]:
    response = client.post("/v2/repository/index", json=body) if body is not None else client.post("/v2/repository/index")
    assert response.status_code == 200
    return {m["name"]: m for m in response.json()}


def test_repository_index_lists_the_fraud_model_and_every_adapter(client):
    models = index(client)
    assert {"alpha", "beta", "gamma", "fraud"} <= set(models)
    assert all(m["state"] == "READY" for m in models.values())
    assert set(index(client, {"ready": True})) == set(models)


def test_repository_load_infer_unload(client, adapters_root):
    load = client.post("/v2/repository/models/delta/load", json={"parameters": {"path": str(adapters_root / "spare" / "delta")}})
    assert load.status_code == 200, load.text
    assert load.json() == {"name": "delta", "state": "READY"}
    assert client.get("/adapters/delta").json()["state"] == "ready"  # the same registry as /adapters
    assert index(client)["delta"]["state"] == "READY"
    assert client.post("/v2/models/delta/infer", json=nli_request()).status_code == 200
    unload = client.post("/v2/repository/models/delta/unload", json={"parameters": {"unload_dependents": False}})
    assert unload.status_code == 200 and unload.json()["state"] == "UNAVAILABLE"
    assert "delta" not in index(client)
    assert client.get("/v2/models/delta/ready").status_code == 404
    assert client.post("/v2/models/delta/infer", json=nli_request()).status_code == 404
    assert client.post("/v2/repository/models/delta/unload").status_code == 404


def test_repository_load_by_name_uses_the_adapter_directory_of_that_name(client):
    assert client.post("/v2/repository/models/gamma/unload").status_code == 200
    assert client.get("/v2/models/gamma/ready").status_code == 404
    load = client.post("/v2/repository/models/gamma/load")  # no body: tritonclient's load_model sends {}
    assert load.status_code == 200 and load.json()["state"] == "READY"
    assert client.get("/v2/models/gamma/ready").status_code == 200


@pytest.mark.parametrize(
    "name,body,status",
    [
        ("fraud", {}, 422),
        ("Bad Name", {}, 422),
        ("missing", {}, 404),
        ("delta", {"parameters": {"path": "/etc"}}, 403),
        ("delta", {"parameters": {"path": 5}}, 422),
        ("delta", {"parameters": {"config": "{}"}}, 422),
    ],
    ids=["the fraud model", "invalid name", "no such directory", "outside the roots", "path not a string", "a Triton config"],
)
def test_repository_load_refusals(client, name, body, status):
    response = client.post(f"/v2/repository/models/{name}/load", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}


def test_repository_management_needs_loopback_without_a_token(client):
    for action in ("load", "unload"):
        status, _, body = asgi_call(client, "POST", f"/v2/repository/models/beta/{action}", client_host="10.1.2.3")
        assert status == 403 and set(json.loads(body)) == {"error"}
    assert client.get("/v2/models/beta/ready").status_code == 200


def test_repository_management_with_an_admin_token(adapters_root):
    app = create_app(settings_for(adapters_root, admin_token="s3cret", fraud_enabled=False))
    with TestClient(app) as client:
        path = "/v2/repository/models/beta/unload"
        assert client.post(path).status_code == 401
        assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.post(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        load = client.post("/v2/repository/models/beta/load", headers={"Authorization": "Bearer s3cret"})
        assert load.status_code == 200
        # Fraud disabled: no such model, and the index does not list it.
        assert client.get("/v2/models/fraud").status_code == 404
        assert "fraud" not in index(client)
