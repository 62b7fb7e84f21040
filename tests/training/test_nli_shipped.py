"""The shipped adapters as artifacts: typed metadata whose checksums hold, a config.json that names the
same labels (plain PEFT gets them), cards that are what their metadata renders, with no machine paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.artifacts import CARD_FILE, MODEL_CONFIG_FILE, AdapterMetadata, sha256_tag
from training.cards import portable, render_card

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("mnli", "snli", "rte")


@pytest.mark.parametrize("name", SHIPPED)
def test_metadata_lists_every_served_file_with_its_checksum(name):
    directory = REPO / "adapters" / name
    metadata = AdapterMetadata.read(directory)
    assert set(metadata.files) == {"adapter_model.safetensors", "adapter_config.json", MODEL_CONFIG_FILE}
    for file_name, checksum in metadata.files.items():
        assert sha256_tag(directory / file_name) == checksum, file_name


@pytest.mark.parametrize("name", SHIPPED)
def test_model_config_names_the_metadata_labels_in_order(name):
    directory = REPO / "adapters" / name
    labels = AdapterMetadata.read(directory).labels
    config = json.loads((directory / MODEL_CONFIG_FILE).read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert "_name_or_path" not in config


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_what_the_metadata_renders_and_holds_no_machine_path(name):
    directory = REPO / "adapters" / name
    card = (directory / CARD_FILE).read_text()
    assert card == render_card(AdapterMetadata.read(directory)), "regenerate: python -m training.cards adapters/*"
    for fragment in ("/work/", "/tmp/", "/home/", "/root/", "site-packages"):
        assert fragment not in card
    # Both token cuts, truthfully: 128 in training, the server's own setting when served.
    assert "max_length=128" in card and "LORASWAP_MAX_SEQ_LEN_TOKENS" in card and "default 256" in card


def test_plain_peft_loads_a_shipped_adapter_with_its_label_names():
    """As the card says: AutoConfig from the adapter directory, the base checkpoint, PeftModel."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from app.inference.base_model import embedded_base_dir

    directory = REPO / "adapters" / "rte"
    config = AutoConfig.from_pretrained(str(directory))
    # The embedded base is sentence-transformers/all-MiniLM-L6-v2; offline, from its local copy.
    base = AutoModelForSequenceClassification.from_pretrained(str(embedded_base_dir()), config=config)
    model = PeftModel.from_pretrained(base, str(directory))
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--train /work/shared/data/rte_train.jsonl --seed 0", "--train rte_train.jsonl --seed 0"),
        (f"--init-adapter {REPO}/adapters/mnli --x", "--init-adapter adapters/mnli --x"),
        ("--output=/tmp/pytest-of-root/p0/tiny-mnli", "--output=tiny-mnli"),
        ("`/tmp/a/tiny-roberta0` (x)", "`tiny-roberta0` (x)"),
        ("an 80/20 split, adapters/mnli, a/b", "an 80/20 split, adapters/mnli, a/b"),
        ("see https://cims.nyu.edu/~sbowman/multinli/ for it", "see https://cims.nyu.edu/~sbowman/multinli/ for it"),
    ],
)
def test_portable_drops_machine_paths_only(text, expected):
    assert portable(text) == expected
