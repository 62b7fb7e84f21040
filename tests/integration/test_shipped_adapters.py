"""The shipped adapters on the embedded base, through the real app: they load, they agree with plain
PEFT (alone and merged) also in a mixed batch, and they classify their held-out fixture rows well."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from app.config import Settings
from app.inference.base_model import build_classifier, load_tokenizer, resolve_base
from app.main import create_app

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("mnli", "snli", "rte")
FIXTURES = {"mnli": "mnli_sample.jsonl", "snli": "snli_sample.jsonl", "rte": "rte_sample.jsonl"}
# Well under each adapter's documented held-out accuracy (>= 0.64 / 0.74 / 0.55): these catch a
# broken adapter or serving path on a few hundred rows, not a drift of a point or two.
FLOOR = {"mnli": 0.58, "snli": 0.68, "rte": 0.52}


def rows(name: str, limit: int | None = None) -> list[dict]:
    lines = (REPO / "data" / "nli" / FIXTURES[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(fraud_enabled=False))) as test_client:
        yield test_client


def test_service_is_ready_with_the_three_shipped_adapters(client):
    assert client.get("/readyz").status_code == 200
    adapters = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert set(SHIPPED) <= set(adapters)
    for name in SHIPPED:
        # The default adapter is loaded at start-up; the others are known from their files until their
        # first use (which another test of this module may already have made).
        assert adapters[name]["state"] in (("ready",) if name == "mnli" else ("known", "ready"))
        assert adapters[name]["rank"] == 16 and adapters[name]["target_modules"] == ["query", "value"]
        assert adapters[name]["size_bytes"] < 5_000_000
    assert adapters["rte"]["labels"] == ["entailment", "not_entailment"]


def test_mixed_batch_equals_peft_alone_and_merged(client):
    spec = resolve_base("embedded")
    tokenizer = load_tokenizer(spec)
    pairs = [(name, row) for name in SHIPPED for row in rows(name, 4)]
    # Interleave the tasks so every forward pass mixes adapters.
    pairs = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: (i % 4, i))]
    body = {"pairs": [{"premise": r["premise"], "hypothesis": r["hypothesis"], "adapter": n} for n, r in pairs]}
    served = client.post("/nli/batch", json=body).json()["results"]
    for name in SHIPPED:
        labels = json.loads((REPO / "adapters" / name / "metadata.json").read_text())["labels"]
        peft = PeftModel.from_pretrained(build_classifier(spec, len(labels)), str(REPO / "adapters" / name)).eval()
        merged = PeftModel.from_pretrained(
            build_classifier(spec, len(labels)), str(REPO / "adapters" / name)
        ).merge_and_unload().eval()
        for (adapter, row), result in zip(pairs, served):
            if adapter != name:
                continue
            x = tokenizer(row["premise"], row["hypothesis"], truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                for model in (peft, merged):
                    want = torch.softmax(model(**x).logits, dim=-1)[0].tolist()
                    got = [result["scores"][label] for label in labels]
                    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


@pytest.mark.parametrize("name", SHIPPED)
def test_held_out_fixture_accuracy(client, name):
    data = rows(name)
    correct = 0
    for start in range(0, len(data), 64):
        chunk = data[start : start + 64]
        body = {"pairs": [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in chunk], "adapter": name}
        results = client.post("/nli/batch", json=body).json()["results"]
        correct += sum(result["label"] == row["label"] for result, row in zip(results, chunk))
    assert correct / len(data) >= FLOOR[name], f"{name}: {correct}/{len(data)}"
