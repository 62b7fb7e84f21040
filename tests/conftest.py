"""Shared fixtures: tiny random bases, the embedded base, and synthetic adapters written for them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROBERTA_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A 2-layer RoBERTa with random weights and the shipped byte-level BPE tokenizer."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-roberta")
    config = RobertaConfig(
        vocab_size=50265,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=300,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(directory)
    for name in ROBERTA_TOKENIZER_FILES:
        shutil.copy(REPO / "app/inference/base_configs/roberta-large" / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_roberta_spec(tiny_roberta_dir):
    from app.inference.base_model import resolve_base

    return resolve_base(str(tiny_roberta_dir))


@pytest.fixture(scope="session")
def embedded_spec():
    from app.inference.base_model import resolve_base

    return resolve_base("embedded")


# (name, labels, target modules, rank, seed): adapters that differ in every way the engine must handle.
SYNTHETIC_ADAPTERS = (
    ("alpha", ("entailment", "neutral", "contradiction"), ("query", "value"), 16, 1),
    ("beta", ("entailment", "not_entailment"), ("query", "value"), 8, 2),
    ("gamma", ("entailment", "neutral", "contradiction"), ("query", "key", "value", "dense"), 4, 3),
)


def write_adapters(spec, root: Path, adapters=SYNTHETIC_ADAPTERS, weight_scale: float = 0.08) -> Path:
    from training.synthetic_adapter import write_random_adapter

    for name, labels, targets, rank, seed in adapters:
        write_random_adapter(
            spec,
            root / name,
            name=name,
            labels=labels,
            rank=rank,
            alpha=2 * rank,
            target_modules=targets,
            seed=seed,
            weight_scale=weight_scale,
        )
    return root


@pytest.fixture(scope="session")
def roberta_adapters(tiny_roberta_spec, tmp_path_factory) -> Path:
    return write_adapters(tiny_roberta_spec, tmp_path_factory.mktemp("roberta-adapters"), weight_scale=0.3)


@pytest.fixture(scope="session")
def embedded_adapters(embedded_spec, tmp_path_factory) -> Path:
    return write_adapters(embedded_spec, tmp_path_factory.mktemp("embedded-adapters"))


def check_jsonschema(schema: Path, document: Path) -> subprocess.CompletedProcess:
    """Validate a manifest against a vendored JSON schema with check-jsonschema (from PyPI)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(document)],
        capture_output=True,
        text=True,
        timeout=120,
    )
