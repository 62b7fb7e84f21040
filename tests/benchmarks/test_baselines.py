"""The naive PEFT server and the merged ceiling compute what PEFT gives for each adapter alone."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from app.artifacts import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from app.artifacts import sha256_tag as sha256_file
from app.inference.base_model import build_classifier, load_tokenizer, resolve_base
from app.inference.engine import NLIEngine
from benchmarks.baselines.naive_peft import NaiveConfig, create_app
from benchmarks.merged_base import build_merged_base
from tests.conftest import SYNTHETIC_ADAPTERS

PAIRS = [
    ("A man is playing a guitar on stage.", "A person plays music."),
    ("Stocks fell sharply on Monday after the announcement.", "Markets rose."),
]
NAMES = [name for name, *_ in SYNTHETIC_ADAPTERS]


def peft_alone(spec, adapter_dir, n_labels: int, premise: str, hypothesis: str, *, merged: bool = False) -> list[float]:
    model = PeftModel.from_pretrained(build_classifier(spec, num_labels=n_labels), str(adapter_dir))
    if merged:
        model = model.merge_and_unload()
    model.eval()
    inputs = load_tokenizer(spec)(premise, hypothesis, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**inputs).logits, dim=-1)[0].tolist()


def test_naive_server_answers_each_adapter_like_peft_alone(tiny_roberta_dir, tiny_roberta_spec, roberta_adapters):
    config = NaiveConfig(base=str(tiny_roberta_dir), adapters={n: roberta_adapters / n for n in NAMES})
    with TestClient(create_app(config)) as client:
        assert client.get("/readyz").status_code == 200
        # Interleaved so every request switches adapter (and head: beta is two-way).
        for premise, hypothesis in PAIRS:
            for name, labels, *_ in SYNTHETIC_ADAPTERS:
                body = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": name}).json()
                assert body["adapter"] == name and list(body["scores"]) == list(labels)
                want = peft_alone(tiny_roberta_spec, roberta_adapters / name, len(labels), premise, hypothesis)
                assert list(body["scores"].values()) == pytest.approx(want, abs=1e-5)
        assert client.post("/nli", json={"premise": "a", "hypothesis": "b", "adapter": "nope"}).status_code == 404


def test_merged_base_serves_what_merge_and_unload_gives(tiny_roberta_spec, roberta_adapters, tmp_path):
    name, labels = "alpha", SYNTHETIC_ADAPTERS[0][1]
    merged = build_merged_base(tiny_roberta_spec, roberta_adapters / name, tmp_path, adapter_name=name)
    head_dir = merged.adapters_dir / name
    config = json.loads((head_dir / CONFIG_FILE).read_text())
    meta = json.loads((head_dir / METADATA_FILE).read_text())
    assert config["target_modules"] == []
    assert meta["files"] == {f: sha256_file(head_dir / f) for f in (WEIGHTS_FILE, CONFIG_FILE)}

    engine = NLIEngine(resolve_base(str(merged.base_dir)), device="cpu")
    adapter = engine.read_adapter(name, head_dir)  # validates the fingerprint and checksums
    assert adapter.a == {} and adapter.labels == labels
    got = engine.run(engine.encode([p for p, _ in PAIRS], [h for _, h in PAIRS]), [adapter] * len(PAIRS))
    for (premise, hypothesis), probabilities in zip(PAIRS, got):
        want = peft_alone(tiny_roberta_spec, roberta_adapters / name, len(labels), premise, hypothesis, merged=True)
        assert probabilities == pytest.approx(want, abs=1e-4)
