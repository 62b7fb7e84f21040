"""deploy/k8s: the KubeRay RayService and the adapters PVC validate against the KubeRay and Kubernetes
schemas (check-jsonschema, the schemas vendored under deploy/k8s/schemas), broken ones are refused, and
the RayService serves the same application as deploy/ray/serve.yaml. Nothing is applied to a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import check_jsonschema

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
RAYSERVICE_SCHEMA = K8S / "schemas" / "rayservice-v1.schema.json"
PVC_SCHEMA = K8S / "schemas" / "persistentvolumeclaim-v1.schema.json"


@pytest.mark.parametrize(
    ("schema", "manifest"), [(RAYSERVICE_SCHEMA, "rayservice.yaml"), (PVC_SCHEMA, "adapters-pvc.yaml")]
)
def test_manifest_is_valid(schema, manifest):
    result = check_jsonschema(schema, K8S / manifest)
    assert result.returncode == 0, result.stdout + result.stderr


def _broken(document: dict, path: list, value) -> dict:
    node = document
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return document


_DELETE = object()
WORKER = ["spec", "rayClusterConfig", "workerGroupSpecs", 0]
CONTAINER = [*WORKER, "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["apiVersion"], "ray.io/v1alpha2"),
        (["spec", "serveConfigV2"], _DELETE),
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 2),  # must be a string
        ([*WORKER, "groupName"], _DELETE),
        ([*WORKER, "replicaz"], 2),
        ([*CONTAINER, "readinessProbe", "httpGet", "port"], [8000]),
        ([*CONTAINER, "volumeMounts", 0, "mountPath"], _DELETE),
        ([*WORKER, "template", "spec", "volumes", 0, "persistentVolumeClaim", "claimName"], _DELETE),
        ([*CONTAINER, "resources", "limits", "nvidia.com/gpu"], {"count": 1}),
    ],
)
def test_a_broken_rayservice_is_refused(tmp_path, path, value):
    document = _broken(yaml.safe_load((K8S / "rayservice.yaml").read_text()), path, value)
    broken = tmp_path / "rayservice.yaml"
    broken.write_text(yaml.safe_dump(document))
    assert check_jsonschema(RAYSERVICE_SCHEMA, broken).returncode == 1


def test_rayservice_serves_the_serve_yaml_application_on_gpu_workers_with_adapters_on_the_claim():
    service = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    pvc = yaml.safe_load((K8S / "adapters-pvc.yaml").read_text())
    serve_yaml = yaml.safe_load((REPO / "deploy" / "ray" / "serve.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"] == serve_yaml["applications"]
    [worker] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    [container] = worker["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    adapters_dir = serve_yaml["applications"][0]["runtime_env"]["env_vars"]["LORASWAP_ADAPTERS_DIR"]
    for group in (service["spec"]["rayClusterConfig"]["headGroupSpec"], worker):
        pod = group["template"]["spec"]
        [volume] = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} == {adapters_dir}
