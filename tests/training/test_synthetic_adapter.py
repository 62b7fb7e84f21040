"""training.synthetic_adapter writes an adapter the way training does (typed metadata, world-readable
files, label names in config.json), and its CLI and training.evaluate's describe themselves."""

from __future__ import annotations

import json

import pytest

from app.artifacts import MODEL_CONFIG_FILE, AdapterMetadata, sha256_tag
from training import evaluate, synthetic_adapter


def test_written_adapter_has_typed_metadata_checksums_and_readable_files(tiny_roberta_spec, tmp_path):
    output = synthetic_adapter.write_random_adapter(
        tiny_roberta_spec, tmp_path / "synth", name="synth", labels=("entailment", "not_entailment"), rank=4, alpha=8
    )
    metadata = AdapterMetadata.read(output)
    assert metadata.name == "synth" and metadata.labels == ["entailment", "not_entailment"]
    assert metadata.lora is not None and (metadata.lora.r, metadata.lora.alpha) == (4, 8)
    assert set(metadata.files) == {"adapter_model.safetensors", "adapter_config.json", MODEL_CONFIG_FILE}
    for file_name, checksum in metadata.files.items():
        assert sha256_tag(output / file_name) == checksum
    for path in output.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name  # a non-root server reads every file
    config = json.loads((output / MODEL_CONFIG_FILE).read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}


@pytest.mark.parametrize(
    ("module", "prog", "default"),
    [
        (synthetic_adapter, "python -m training.synthetic_adapter", "(default: 16)"),
        (evaluate, "python -m training.evaluate", "(default: 13)"),
    ],
)
def test_help_names_the_module_and_shows_defaults(module, prog, default, capsys):
    with pytest.raises(SystemExit) as excinfo:
        module.main(["--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {prog} ")
    assert default in text
    assert ".py" not in text.split("\n", 1)[0]
