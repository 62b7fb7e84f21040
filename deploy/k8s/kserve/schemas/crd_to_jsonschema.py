"""Turns a KServe CustomResourceDefinition into the JSON Schema of one of its versions, for
check-jsonschema: descriptions dropped (size), apiVersion and kind pinned, and unknown fields refused
wherever the CRD lists the fields (the API server would silently prune them; a typo must fail here).

    python deploy/k8s/kserve/schemas/crd_to_jsonschema.py CRD.yaml VERSION OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if k != "description"}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def convert(crd: dict[str, Any], version: str) -> dict[str, Any]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
    }
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"{kind} {group}/{version}", **schema}


def main() -> None:
    source, version, target = sys.argv[1:4]
    crd = yaml.safe_load(Path(source).read_text())
    Path(target).write_text(json.dumps(convert(crd, version), sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
