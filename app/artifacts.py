"""What an artifact directory holds, defined once: adapter file names, the typed `metadata.json` that
training writes and the server reads, the checksum helper, and atomic writes. No torch here."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The files of an adapter directory (PEFT's names for the first two).
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
CURVE_FILE = "training_curve.png"
# A transformers config beside the adapter (PEFT users save one for id2label); full fine-tunes write it too.
MODEL_CONFIG_FILE = "config.json"

ADAPTER_FORMAT_VERSION = 1
SHA256_PREFIX = "sha256:"


def sha256_hex(path: Path) -> str:
    """The file's sha256 as 64 hex digits, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tag(path: Path) -> str:
    """The file's sha256 as `sha256:<hex>`, the form adapter metadata records."""
    return SHA256_PREFIX + sha256_hex(path)


def sha256_tag_of(data: bytes) -> str:
    """`sha256_tag` of bytes already read."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and rename it over `path`, so a reader
    sees the old file or the new one, never half of one. The file is world-readable (0644)."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


class BaseRecord(BaseModel):
    """The base an adapter was trained on; `fingerprint` is what the server compares."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="`embedded`, a Hugging Face id or a directory.")
    display: str | None = None
    model_type: str | None = None
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    random_init: bool = False
    seed: int = 0


class LoraRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(ge=1)
    alpha: float
    dropout: float = Field(ge=0, le=1)
    target_modules: list[str] = Field(default_factory=list, description="Empty for a head-only adapter (a linear probe).")


class AdapterMetadata(BaseModel):
    """`metadata.json` of an adapter directory: the one definition of what an adapter declares.
    Written atomically by training, read and trusted by the server (labels, base fingerprint,
    checksums of the other files)."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = ADAPTER_FORMAT_VERSION
    name: str = Field(min_length=1)
    task: str = "unknown"
    labels: list[str] = Field(min_length=2, description="Class names in the head's output order.")
    base: BaseRecord
    method: Literal["lora", "full"] = "lora"
    lora: LoraRecord | None = None
    max_length: int | None = Field(None, ge=1, description="Token length pairs were cut to in training.")
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="File name -> `sha256:<hex>`.")
    created_at: str | None = None

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        if not all(isinstance(x, str) and x.strip() for x in labels) or len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct non-empty strings")
        return labels

    @field_validator("files")
    @classmethod
    def _plain_file_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name, checksum in files.items():
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(f"{name!r} is not a file name inside the adapter directory")
            if not checksum.startswith(SHA256_PREFIX) or len(checksum) != len(SHA256_PREFIX) + 64:
                raise ValueError(f"the checksum of {name} must be sha256:<64 hex digits>")
        return files

    def numeric_metrics(self) -> dict[str, float]:
        """The scalar metrics (accuracy, loss), for listings; histories and strings left out."""
        return {
            k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    @classmethod
    def read(cls, directory: Path) -> AdapterMetadata:
        """Parse `directory/metadata.json`. Raises FileNotFoundError, ValueError (not JSON) or
        pydantic's ValidationError (a ValueError too) with what is wrong."""
        text = (Path(directory) / METADATA_FILE).read_text(encoding="utf-8")
        return cls.model_validate_json(text)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / METADATA_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @staticmethod
    def checksums(directory: Path, names: list[str]) -> dict[str, str]:
        return {name: sha256_tag(Path(directory) / name) for name in names}
