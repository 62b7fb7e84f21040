"""deploy/k8s/kserve/: the ServingRuntime and InferenceService validate (check-jsonschema) against the
schemas of KServe's CRDs vendored beside them, a broken manifest fails that same check, and the manifests
say what the project serves (protocol v2, one GPU, the project's image, probes on real routes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config import Settings
from app.main import create_app
from tests.conftest import check_jsonschema

REPO = Path(__file__).resolve().parent.parent
KSERVE = REPO / "deploy" / "k8s" / "kserve"
SCHEMAS = {
    "servingruntime.yaml": KSERVE / "schemas" / "servingruntime-serving.kserve.io-v1alpha1.json",
    "inferenceservice.yaml": KSERVE / "schemas" / "inferenceservice-serving.kserve.io-v1beta1.json",
}


def load(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_manifest_validates_against_kserves_crd_schema(name):
    result = check_jsonschema(SCHEMAS[name], KSERVE / name)
    assert result.returncode == 0, result.stdout + result.stderr


def _typo(doc):
    doc["spec"]["predictor"]["model"]["protocolVersions"] = doc["spec"]["predictor"]["model"].pop("protocolVersion")


def _gpu_as_list(doc):
    doc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] = ["1"]


def _wrong_kind(doc):
    doc["kind"] = "InferenceServices"


def _container_without_name(doc):
    del doc["spec"]["containers"][0]["name"]


def _port_as_text(doc):
    doc["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"


BROKEN = [
    ("inferenceservice.yaml", _typo),
    ("inferenceservice.yaml", _gpu_as_list),
    ("inferenceservice.yaml", _wrong_kind),
    ("servingruntime.yaml", _container_without_name),
    ("servingruntime.yaml", _port_as_text),
]


@pytest.mark.parametrize("name,breaks", BROKEN, ids=[b[1].__name__.strip("_") for b in BROKEN])
def test_a_broken_manifest_fails_the_check(tmp_path, name, breaks):
    doc = load(name)
    breaks(doc)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(doc))
    assert check_jsonschema(SCHEMAS[name], broken).returncode != 0


def test_manifests_serve_protocol_v2_on_one_gpu_with_the_projects_image():
    runtime, service = load("servingruntime.yaml"), load("inferenceservice.yaml")
    [container] = runtime["spec"]["containers"]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert container["image"] == _compose_image()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= set(f"LORASWAP_{name.upper()}" for name in Settings.model_fields)
    assert int(env["LORASWAP_PORT"]) == container["ports"][0]["containerPort"]
    served = set(create_app(Settings(nli_enabled=False, fraud_enabled=False)).openapi()["paths"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in served
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def _compose_image() -> str:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    images = {s["image"] for s in compose["services"].values() if "image" in s}
    images |= {v["image"] for k, v in compose.items() if k.startswith("x-") and isinstance(v, dict) and "image" in v}
    [image] = images
    return image
