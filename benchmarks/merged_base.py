"""The merged ceiling: one adapter folded into the base, served by loraswap as a head-only adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from app.artifacts import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from app.inference.adapter_loader import PEFT_PREFIX
from app.inference.base_model import BaseSpec, build_classifier, fingerprint, load_tokenizer, resolve_base
from benchmarks.adapter_sets import write_metadata

logger = logging.getLogger(__name__)

HEAD_PREFIX = PEFT_PREFIX + "classifier."


@dataclass(frozen=True)
class MergedBase:
    base_dir: Path  # what LORASWAP_BASE_MODEL points at
    adapters_dir: Path  # holds the one head-only adapter
    adapter_name: str
    labels: tuple[str, ...]


def build_merged_base(spec: BaseSpec, adapter_dir: Path, output: Path, *, adapter_name: str) -> MergedBase:
    """Merge `adapter_dir` into the base, save it under output/base, and write a head-only adapter
    for it under output/adapters/<adapter_name>."""
    meta = json.loads((adapter_dir / METADATA_FILE).read_text())
    labels = tuple(meta["labels"])
    base_dir = output / "base"
    head_dir = output / "adapters" / adapter_name
    base_dir.mkdir(parents=True, exist_ok=True)
    head_dir.mkdir(parents=True, exist_ok=True)

    merged = PeftModel.from_pretrained(build_classifier(spec, len(labels)), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(base_dir))
    load_tokenizer(spec).save_pretrained(str(base_dir))
    del merged

    # The head stays an adapter (the server builds heads per adapter); its keys are the original's.
    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt") as handle:
        head = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(HEAD_PREFIX)}
        file_metadata = handle.metadata()
    if not head:
        raise ValueError(f"{adapter_dir} has no classification head under {HEAD_PREFIX}")
    save_file(head, str(head_dir / WEIGHTS_FILE), metadata=file_metadata)
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config["target_modules"] = []
    (head_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # The fingerprint is the server's own view of the merged base: loaded back the way it loads it.
    merged_fingerprint = fingerprint(build_classifier(resolve_base(str(base_dir)), len(labels)))
    meta["base"] = {
        **meta.get("base", {}),
        "id": str(base_dir),
        "display": f"{spec.display_id} with {adapter_name} merged",
        "fingerprint": merged_fingerprint,
    }
    meta["lora"] = {**meta.get("lora", {}), "target_modules": []}
    write_metadata(head_dir, meta)
    logger.info("merged %s into %s (head-only adapter at %s)", adapter_dir, base_dir, head_dir)
    return MergedBase(base_dir=base_dir, adapters_dir=head_dir.parent, adapter_name=adapter_name, labels=labels)
