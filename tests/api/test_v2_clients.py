"""The Open Inference Protocol v2 routes with the ecosystem's own clients against a real uvicorn server on
127.0.0.1: Triton's `tritonclient.http` (health, metadata, inference with JSON and with binary tensors,
the repository index, load and unload) and KServe's `InferenceRESTClient`. Answers must equal the native
routes' for the same pairs and transactions."""

from __future__ import annotations

import asyncio

import httpx
import kserve
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.reliability.conftest import SHIPPED_FRAUD, copy_adapters, serve, server_settings

PREMISES = ["A man is playing a guitar on stage.", "Two dogs run in a park.", "Le café est fermé."]
HYPOTHESES = ["A person is making music.", "Animals are moving.", "Le café est ouvert."]
FEATURES = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount"]
TRANSACTIONS = [[10.0] + [0.1] * 28 + [12.5], [50_000.0] + [-3.0, 4.0, -6.0, 5.0] * 7 + [900.0]]


@pytest.fixture(scope="module")
def server(embedded_adapters, tmp_path_factory):
    root = copy_adapters(embedded_adapters, tmp_path_factory.mktemp("served"))
    settings = server_settings(root, fraud_enabled=True, fraud_model_dir=SHIPPED_FRAUD)
    yield from serve(tmp_path_factory.mktemp("server"), **settings)


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def native_scores(server, adapter: str) -> list[dict]:
    pairs = [{"premise": p, "hypothesis": h} for p, h in zip(PREMISES, HYPOTHESES)]
    response = httpx.post(f"{server.base_url}/nli/batch", json={"pairs": pairs, "adapter": adapter}, timeout=60)
    assert response.status_code == 200
    return response.json()["results"]


def text_inputs(binary: bool):
    inputs = []
    for name, texts in (("premise", PREMISES), ("hypothesis", HYPOTHESES)):
        tensor = httpclient.InferInput(name, [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("alpha") and triton.is_model_ready("fraud")
    assert not triton.is_model_ready("nope")
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "loraswap"
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])
    alpha = triton.get_model_metadata("alpha")
    assert [i["name"] for i in alpha["inputs"]] == ["premise", "hypothesis"]
    assert alpha["parameters"]["labels"] == ["entailment", "neutral", "contradiction"]
    assert triton.get_model_metadata("fraud")["inputs"][0]["shape"] == [-1, 30]


@pytest.mark.parametrize("binary", [False, True], ids=["json tensors", "binary tensors"])
def test_tritonclient_nli_inference_equals_native(server, triton, binary):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    result = triton.infer("beta", text_inputs(binary), outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    # JSON BYTES come back as str, binary ones as bytes (tritonclient keeps what the wire carried).
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 2)
    for row, native in enumerate(native_scores(server, "beta")):
        assert labels[row] == native["label"]
        assert probabilities[row].tolist() == pytest.approx(
            [native["scores"][k] for k in ("entailment", "not_entailment")], abs=1e-6
        )


def test_tritonclient_defaults_to_binary_everywhere(server, triton):
    # No outputs named: tritonclient asks for every output as binary (binary_data_output).
    result = triton.infer("alpha", text_inputs(binary=True))
    assert result.as_numpy("probabilities").shape == (3, 3)
    assert [v.decode() for v in result.as_numpy("label")] == [r["label"] for r in native_scores(server, "alpha")]


@pytest.mark.parametrize("binary", [False, True], ids=["json tensors", "binary tensors"])
def test_tritonclient_fraud_inference_equals_native(server, triton, binary):
    features = httpclient.InferInput("features", [2, 30], "FP32")
    features.set_data_from_numpy(np.array(TRANSACTIONS, dtype=np.float32), binary_data=binary)
    result = triton.infer("fraud", [features])
    native = httpx.post(
        f"{server.base_url}/fraud/batch", json={"transactions": [dict(zip(FEATURES, r)) for r in TRANSACTIONS]}
    ).json()["results"]
    assert result.as_numpy("is_fraud").tolist() == [r["is_fraud"] for r in native]
    assert result.as_numpy("fraud_probability").tolist() == pytest.approx(
        [r["fraud_probability"] for r in native], rel=1e-5
    )


def test_tritonclient_errors_carry_the_protocols_message_and_status(triton):
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("nope", text_inputs(binary=True))
    assert unknown.value.status() == "404" and "nope" in unknown.value.message()
    features = httpclient.InferInput("features", [1, 30], "FP32")
    features.set_data_from_numpy(np.array([[np.nan] + [0.0] * 29], dtype=np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as nan:
        triton.infer("fraud", [features])
    assert nan.value.status() == "422" and "finite" in nan.value.message()
    assert triton.is_server_ready()


def test_tritonclient_repository_index_unload_and_load(triton):
    index = {m["name"]: m["state"] for m in triton.get_model_repository_index()}
    assert index == {"alpha": "READY", "beta": "READY", "gamma": "READY", "fraud": "READY"}
    triton.unload_model("gamma")
    assert not triton.is_model_ready("gamma")
    assert "gamma" not in {m["name"] for m in triton.get_model_repository_index()}
    triton.load_model("gamma")  # the adapter directory of that name under the adapters root
    assert triton.is_model_ready("gamma")
    assert triton.infer("gamma", text_inputs(binary=True)).as_numpy("probabilities").shape == (3, 3)
    with pytest.raises(InferenceServerException) as refused:
        triton.load_model("fraud")
    assert refused.value.status() == "422"


def test_kserve_rest_client(server):
    async def run():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            assert await client.is_server_live(server.base_url)
            assert await client.is_server_ready(server.base_url)
            assert await client.is_model_ready(server.base_url, "alpha")
            json_request = kserve.InferRequest(
                model_name="alpha",
                infer_inputs=[
                    kserve.InferInput("premise", [3], "BYTES", data=PREMISES),
                    kserve.InferInput("hypothesis", [3], "BYTES", data=HYPOTHESES),
                ],
            )
            json_answer = await client.infer(server.base_url, json_request, model_name="alpha")
            binary_inputs = []
            for name, texts in (("premise", PREMISES), ("hypothesis", HYPOTHESES)):
                tensor = kserve.InferInput(name, [3], "BYTES")
                tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=True)
                binary_inputs.append(tensor)
            binary_request = kserve.InferRequest(model_name="alpha", infer_inputs=binary_inputs)
            binary_answer = await client.infer(server.base_url, binary_request, model_name="alpha")
            fraud_input = kserve.InferInput("features", [2, 30], "FP32")
            fraud_input.set_data_from_numpy(np.array(TRANSACTIONS, dtype=np.float32), binary_data=True)
            fraud_request = kserve.InferRequest(model_name="fraud", infer_inputs=[fraud_input])
            fraud_answer = await client.infer(server.base_url, fraud_request, model_name="fraud")
            return json_answer, binary_answer, fraud_answer
        finally:
            await client.close()

    json_answer, binary_answer, fraud_answer = asyncio.run(run())
    native = native_scores(server, "alpha")
    for answer in (json_answer, binary_answer):
        outputs = {o.name: o for o in answer.outputs}
        probabilities = outputs["probabilities"].as_numpy()
        assert probabilities.shape == (3, 3)
        for row, result in enumerate(native):
            assert probabilities[row].tolist() == pytest.approx(
                [result["scores"][k] for k in ("entailment", "neutral", "contradiction")], abs=1e-6
            )
        labels = [v.decode() if isinstance(v, bytes) else v for v in outputs["label"].as_numpy().tolist()]
        assert labels == [r["label"] for r in native]
    fraud = {o.name: o for o in fraud_answer.outputs}
    assert fraud["is_fraud"].as_numpy().shape == (2,) and fraud["fraud_probability"].as_numpy().dtype == np.float32
