"""Build the model an NLI run trains: the base classifier with the task's labels, wrapped in PEFT LoRA
(optionally started from another adapter's matrices) or left whole for full fine-tuning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from app.artifacts import METADATA_FILE, WEIGHTS_FILE, AdapterMetadata, LoraRecord
from app.inference.base_model import (
    BaseModelError,
    BaseSpec,
    build_classifier,
    count_parameters,
    fingerprint,
    resolve_base,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """What to build: the base, how it is trained (`lora` set for LoRA, None for full), and the seed
    of the random base, the head and the LoRA A matrices."""

    base: str
    random_init: bool = False
    seed: int = 0
    lora: LoraRecord | None = None
    init_adapter: Path | None = None

    @property
    def method(self) -> Literal["lora", "full"]:
        return "lora" if self.lora is not None else "full"


@dataclass
class BuiltModel:
    spec: BaseSpec
    model: torch.nn.Module  # what gets trained: a PeftModel for lora, the classifier itself for full
    classifier: torch.nn.Module  # the transformers classifier inside `model`; its config names the labels
    base_fingerprint: str | None
    model_type: str
    trainable_params: int
    all_params: int


def build_model(config: ModelConfig, labels: tuple[str, ...], *, with_fingerprint: bool) -> BuiltModel:
    """The classifier on the base with one head of len(labels) classes named in its config, wrapped
    for the method. `with_fingerprint=False` skips hashing the base (a dry run)."""
    spec = resolve_base(config.base, random_init=config.random_init, seed=config.seed)
    classifier = build_classifier(spec, len(labels), head_seed=config.seed)
    classifier.config.id2label = dict(enumerate(labels))
    classifier.config.label2id = {label: i for i, label in enumerate(labels)}
    # The report's denominator: base + one head, before PEFT adds LoRA matrices and a head copy.
    all_params = count_parameters(classifier)
    base_fingerprint = fingerprint(classifier) if with_fingerprint else None
    model_type = classifier.config.model_type
    if config.lora is None:
        return BuiltModel(spec, classifier, classifier, base_fingerprint, model_type, all_params, all_params)

    from peft import LoraConfig, TaskType, get_peft_model

    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the classification head into modules_to_save
        r=config.lora.r,
        lora_alpha=int(config.lora.alpha) if float(config.lora.alpha).is_integer() else config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
    )
    torch.manual_seed(config.seed)  # LoRA A matrices are random
    model = get_peft_model(classifier, lora_config)
    if config.init_adapter is not None:
        load_lora_matrices(model, config.init_adapter, base_fingerprint)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return BuiltModel(spec, model, classifier, base_fingerprint, model_type, trainable, all_params)


def load_lora_matrices(model: torch.nn.Module, adapter_dir: Path, base_fingerprint: str | None) -> None:
    """Copy another adapter's LoRA A/B matrices into `model` (not its head); shapes and base must agree."""
    from safetensors.torch import load_file

    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file() or not (adapter_dir / METADATA_FILE).is_file():
        raise BaseModelError(f"--init-adapter {adapter_dir}: needs {WEIGHTS_FILE} and {METADATA_FILE}")
    try:
        recorded = AdapterMetadata.read(adapter_dir).base.fingerprint
    except ValueError as exc:
        raise BaseModelError(f"--init-adapter {adapter_dir}: {METADATA_FILE} is not valid adapter metadata") from exc
    if base_fingerprint is not None and recorded != base_fingerprint:
        raise BaseModelError(f"--init-adapter {adapter_dir} was trained on another base ({recorded})")
    # Saved names omit the adapter name: "...query.lora_A.weight" is "...query.lora_A.default.weight" here.
    lora = {
        key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): value
        for key, value in load_file(str(weights_path)).items()
        if "lora_" in key
    }
    own = model.state_dict()
    own_lora = {key for key in own if "lora_" in key}
    if set(lora) != own_lora:
        raise BaseModelError(f"--init-adapter {adapter_dir}: its LoRA layers differ from this model's (target modules)")
    for key, value in lora.items():
        if value.shape != own[key].shape:
            raise BaseModelError(
                f"--init-adapter {adapter_dir}: {key} has shape {tuple(value.shape)}, here {tuple(own[key].shape)} (rank)"
            )
    model.load_state_dict(lora, strict=False)
    logger.info("LoRA matrices initialised from %s (%d tensors); the head starts fresh", adapter_dir, len(lora))
