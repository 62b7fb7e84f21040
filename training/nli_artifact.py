"""Write an NLI run's artifact directory: weights, the transformers config with the label names,
the typed metadata.json (app.artifacts), the training curve and the model card; never over an
existing artifact unless asked, and never half-written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.artifacts import (
    CARD_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    METADATA_FILE,
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterMetadata,
    BaseRecord,
    LoraRecord,
    sha256_tag,
    write_json_atomic,
    write_text_atomic,
)
from app.inference.base_model import EMBEDDED_BASE, EMBEDDED_BASE_ID
from training.nli_model import BuiltModel

logger = logging.getLogger(__name__)


class ArtifactExistsError(ValueError):
    """The output directory already holds something this run must not replace; the message says why."""


def check_output(output: Path, *, force: bool) -> None:
    """Refuse an output that holds an artifact (unless `force`) or anything else (always): a run
    that silently replaced a shipped adapter is how adapters/rte once lost its 0.646."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ArtifactExistsError(f"{output} exists and is not a directory; choose another --output")
    if not any(output.iterdir()):
        return
    if not (output / METADATA_FILE).is_file():
        raise ArtifactExistsError(
            f"{output} is a non-empty directory that holds no artifact ({METADATA_FILE}); choose another --output"
        )
    if not force:
        raise ArtifactExistsError(
            f"{output} already holds an artifact; pass --force to replace it, or choose another --name or --output"
        )


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """A fresh directory beside `output` to write into; on success it replaces `output` (a reader
    sees the old artifact or the new one, never a mix), on failure it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; artifacts are meant to be shared
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / output.name)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


def public_base_id(base_name: str) -> str:
    """The base as a user finds it: the Hugging Face id of the embedded base, else the name given."""
    return EMBEDDED_BASE_ID if base_name == EMBEDDED_BASE else base_name


def write_model_config(classifier: Any, directory: Path) -> Path:
    """config.json beside an adapter: the classifier's transformers config with id2label/label2id,
    so plain PEFT users get the label names (`AutoConfig.from_pretrained(adapter_dir)`)."""
    config = classifier.config
    data = config.to_diff_dict()
    data.pop("_name_or_path", None)  # the directory the base was loaded from on this machine
    data["architectures"] = [type(classifier).__name__]  # the base checkpoint's says e.g. BertModel
    data["id2label"] = {str(i): label for i, label in sorted(config.id2label.items())}
    data["label2id"] = {label: int(i) for label, i in config.label2id.items()}
    path = directory / MODEL_CONFIG_FILE
    write_json_atomic(path, data)
    return path


def save_weights(built: BuiltModel, method: str, tokenizer, directory: Path) -> list[str]:
    """Write the weights (safetensors) and configs; return the file names metadata must checksum."""
    built.model.save_pretrained(str(directory), safe_serialization=True)
    if method == "lora":
        # PEFT records the directory the base was loaded from (this machine's venv for the embedded
        # base); record the base's public id instead. Set after saving: before, PEFT tries the hub.
        config_path = directory / CONFIG_FILE
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = public_base_id(built.spec.name)
        write_text_atomic(config_path, json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        write_model_config(built.classifier, directory)
        names = [WEIGHTS_FILE, CONFIG_FILE, MODEL_CONFIG_FILE]
    else:
        tokenizer.save_pretrained(str(directory))
        names = sorted(p.name for p in directory.glob("*.safetensors")) + [MODEL_CONFIG_FILE]
    for name in names:
        (directory / name).chmod(0o644)  # safetensors writes 0600; artifacts are meant to be shared
    return names


def describe_init_adapter(adapter_dir: Path | None) -> str | None:
    if adapter_dir is None:
        return None
    return f"{adapter_dir} ({WEIGHTS_FILE} {sha256_tag(adapter_dir / WEIGHTS_FILE)})"


def build_metadata(
    *,
    name: str,
    task: str,
    labels: tuple[str, ...],
    built: BuiltModel,
    lora: LoraRecord | None,
    max_length: int,
    training: dict[str, Any],
    metrics: dict[str, Any],
    directory: Path,
    files: list[str],
) -> AdapterMetadata:
    """The typed metadata of the artifact in `directory`, with checksums of `files` as written there."""
    return AdapterMetadata(
        name=name,
        task=task,
        labels=list(labels),
        base=BaseRecord(
            id=built.spec.name,
            display=built.spec.display_id,
            model_type=built.model_type,
            fingerprint=built.base_fingerprint,
            random_init=built.spec.random_init,
            seed=built.spec.seed,
        ),
        method="lora" if lora is not None else "full",
        lora=lora,
        max_length=max_length,
        training=training,
        metrics=metrics,
        files=AdapterMetadata.checksums(directory, files),
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def write_metadata_card_and_curve(metadata: AdapterMetadata, directory: Path) -> None:
    """metadata.json (atomic), the training curve from its history, and the card rendered from it."""
    from training.cards import render_card, write_training_curve

    metadata.write(directory)
    write_training_curve(
        metadata.metrics.get("history", []), directory / CURVE_FILE, title=f"{metadata.name} ({metadata.method})"
    )
    write_text_atomic(directory / CARD_FILE, render_card(metadata))
