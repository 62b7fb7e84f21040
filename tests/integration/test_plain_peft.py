"""Bring your own PEFT adapter: a directory written by plain PEFT (`get_peft_model(..., LoraConfig(
task_type="SEQ_CLS"))` then `save_pretrained`, the classifier saved through modules_to_save) loads by
PUT with the labels in the body, answers as PEFT does within 1e-4, and is refused clearly without labels
or when made for another base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model

from app.inference.base_model import build_classifier, load_tokenizer
from app.main import create_app
from tests.api.test_nli_api import settings_for

LABELS = ["yes", "maybe", "no"]
PAIRS = [("A dog runs in the park.", "An animal is outside."), ("Nobody came.", "The room was full of guests.")]


def write_plain_peft(spec, directory: Path, base_name: str) -> Path:
    """Exactly what a PEFT user writes: adapter_config.json + adapter_model.safetensors, nothing else."""
    model = build_classifier(spec, num_labels=len(LABELS), head_seed=7)
    peft_model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: give the adapter an effect
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(directory))
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    return directory


def peft_reference(spec, directory: Path) -> list[list[float]]:
    model = PeftModel.from_pretrained(build_classifier(spec, num_labels=len(LABELS)), str(directory)).eval()
    tokenizer = load_tokenizer(spec)
    with torch.no_grad():
        return [
            torch.softmax(model(**tokenizer(p, h, truncation=True, max_length=256, return_tensors="pt")).logits, -1)[0].tolist()
            for p, h in PAIRS
        ]


@pytest.fixture(scope="module")
def plain(embedded_spec, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo")
    write_plain_peft(embedded_spec, root / "mine", "sentence-transformers/all-MiniLM-L6-v2")
    write_plain_peft(embedded_spec, root / "foreign", "roberta-large")
    return root


def test_a_plain_peft_adapter_loads_with_labels_and_answers_as_peft(embedded_spec, embedded_adapters, plain):
    want = peft_reference(embedded_spec, plain / "mine")
    settings = settings_for(embedded_adapters, adapter_roots=[plain])
    with TestClient(create_app(settings)) as client:
        put = client.put("/adapters/mine", json={"path": str(plain / "mine"), "labels": LABELS})
        assert put.status_code == 200, put.json()
        assert put.json()["labels"] == LABELS and put.json()["rank"] == 8
        for (premise, hypothesis), probs in zip(PAIRS, want):
            body = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": "mine"}).json()
            assert max(abs(body["scores"][label] - p) for label, p in zip(LABELS, probs)) < 1e-4
            assert body["label"] == LABELS[max(range(3), key=probs.__getitem__)]


@pytest.mark.parametrize(
    "name,body_extra,hint",
    [
        ("mine", {}, "labels"),  # no labels anywhere: the 422 says how to give them
        ("foreign", {"labels": LABELS}, "roberta-large"),  # made for another base
        ("mine", {"labels": ["only-one"]}, "labels"),
    ],
    ids=["no labels", "another base", "one label"],
)
def test_a_plain_peft_adapter_is_refused_clearly(embedded_adapters, plain, name, body_extra, hint):
    settings = settings_for(embedded_adapters, adapter_roots=[plain])
    with TestClient(create_app(settings)) as client:
        response = client.put(f"/adapters/{name}", json={"path": str(plain / name), **body_extra})
        assert response.status_code == 422
        assert hint in response.json()["error"]["message"]
