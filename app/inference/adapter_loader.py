"""Read and validate one adapter directory eagerly, so a bad adapter fails at load time, never on a
request: metadata, base fingerprint, label set, PEFT config, checksums, safetensors only, shapes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from app.inference.base_model import build_head

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METADATA_FILE = "metadata.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."
SUPPORTED_FORMAT_VERSIONS = (1,)
# PEFT options that change the math; an adapter that uses one is refused rather than served wrong.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
}
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterLoadError(Exception):
    """Why an adapter cannot be served. `kind` is `not_found` (nothing usable at the path) or
    `invalid` (files present but wrong for this base)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must match: the served base's fingerprint and its LoRA-able modules."""

    fingerprint: str
    model_type: str
    base_model_prefix: str
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    config: Any  # the base's PretrainedConfig, to build heads


@dataclass(eq=False)
class AdapterWeights:
    """One loaded adapter on the host. Immutable once built; requests hold a reference to it, so a
    replaced or unloaded adapter stays valid for the batches that still use it."""

    name: str
    labels: tuple[str, ...]
    task: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_id: str
    size_bytes: int
    metadata: dict[str, Any]
    path: Path
    a: dict[str, torch.Tensor] = field(repr=False)  # module path -> [r, in]
    b: dict[str, torch.Tensor] = field(repr=False)  # module path -> [out, r], scaled
    head: nn.Module = field(repr=False)
    version: int = 0

    def nbytes(self) -> int:
        tensors = [*self.a.values(), *self.b.values(), *self.head.state_dict().values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterLoadError("invalid", f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError("invalid", f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError("invalid", f"{path.name} must hold a JSON object")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _check_files(directory: Path) -> None:
    if not directory.is_dir():
        raise AdapterLoadError("not_found", f"no adapter directory at {directory}")
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterLoadError(
                "invalid", f"pickle weights ({', '.join(pickled)}) are refused; save the adapter as {WEIGHTS_FILE}"
            )
        raise AdapterLoadError("invalid", f"{WEIGHTS_FILE} is missing")


def _check_metadata(meta: dict[str, Any], base: BaseInfo) -> tuple[tuple[str, ...], str]:
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise AdapterLoadError("invalid", f"metadata format_version must be one of {SUPPORTED_FORMAT_VERSIONS}")
    if meta.get("method", "lora") != "lora":
        raise AdapterLoadError("invalid", f"method {meta.get('method')!r} is not a LoRA adapter")
    labels = meta.get("labels")
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise AdapterLoadError("invalid", "metadata labels must be at least two distinct non-empty strings")
    base_meta = meta.get("base")
    fingerprint = base_meta.get("fingerprint") if isinstance(base_meta, dict) else None
    if fingerprint != base.fingerprint:
        trained_on = base_meta.get("display") or base_meta.get("id") if isinstance(base_meta, dict) else None
        raise AdapterLoadError(
            "invalid",
            f"adapter was trained on another base ({trained_on or 'unknown'}, fingerprint "
            f"{str(fingerprint)[:19]}...), not the served one ({base.fingerprint[:19]}...)",
        )
    task = meta.get("task")
    return tuple(labels), task if isinstance(task, str) else "unknown"


def _check_peft_config(config: dict[str, Any]) -> tuple[int, float, float]:
    if config.get("peft_type") != "LORA":
        raise AdapterLoadError("invalid", f"peft_type must be LORA, not {config.get('peft_type')!r}")
    if config.get("task_type") not in ("SEQ_CLS", None):
        raise AdapterLoadError("invalid", f"task_type must be SEQ_CLS, not {config.get('task_type')!r}")
    for option, plain in UNSUPPORTED_PEFT_OPTIONS.items():
        if config.get(option, plain) not in (plain, None, False):
            raise AdapterLoadError("invalid", f"adapter option {option}={config.get(option)!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError("invalid", "adapters that train biases (bias != 'none') are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterLoadError("invalid", "per-module rank_pattern / alpha_pattern is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterLoadError("invalid", "adapter_config needs a positive integer r and a finite lora_alpha")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(alpha), scale


def _split_tensors(
    tensors: dict[str, torch.Tensor], base: BaseInfo
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    encoder_prefix = base.base_model_prefix + "."
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.startswith("classifier."):
            head[name.removeprefix("classifier.").replace("modules_to_save.default.", "")] = tensor
            continue
        match = LORA_KEY.match(name)
        if not match or not match.group("module").startswith(encoder_prefix):
            raise AdapterLoadError("invalid", f"unexpected tensor {key!r} in {WEIGHTS_FILE}")
        module = match.group("module").removeprefix(encoder_prefix)
        if module not in base.linear_shapes:
            raise AdapterLoadError("invalid", f"adapter targets {module!r}, which is not a Linear layer of this base")
        (lora_a if match.group("part") == "A" else lora_b)[module] = tensor
    if set(lora_a) != set(lora_b):
        raise AdapterLoadError("invalid", "every LoRA module needs both lora_A and lora_B")
    # No LoRA tensors at all is allowed: a head-only adapter (a linear probe on the frozen base).
    if not head:
        raise AdapterLoadError("invalid", f"{WEIGHTS_FILE} holds no classification head (modules_to_save)")
    return lora_a, lora_b, head


def load_adapter(name: str, directory: Path, base: BaseInfo) -> AdapterWeights:
    """Everything that can be wrong with an adapter raises AdapterLoadError here."""
    directory = Path(directory)
    _check_files(directory)
    meta = _read_json(directory / METADATA_FILE)
    labels, task = _check_metadata(meta, base)
    peft_config = _read_json(directory / CONFIG_FILE)
    rank, alpha, scale = _check_peft_config(peft_config)

    weights_path = directory / WEIGHTS_FILE
    declared = meta.get("files") or {}
    for file_name, checksum in declared.items():
        target = directory / file_name
        if "/" in file_name or not target.is_file():
            raise AdapterLoadError("invalid", f"metadata lists {file_name!r}, which is not in the adapter directory")
        if sha256_file(target) != checksum:
            raise AdapterLoadError("invalid", f"{file_name} does not match its sha256 in metadata.json")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError("invalid", f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None

    lora_a, lora_b, head_state = _split_tensors(tensors, base)
    del tensors
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    for module, a in lora_a.items():
        b = lora_b[module]
        in_features, out_features = base.linear_shapes[module]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterLoadError(
                "invalid",
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit r={rank} "
                f"on a {in_features}->{out_features} layer",
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError("invalid", f"{module}: LoRA weights contain NaN or infinity")
        # Copies, never views: load_file's tensors map the file, so a view would keep the mapping
        # alive (memory twice over) and would change, or crash the process, if the file changed.
        a_out[module] = a.to(torch.float32, copy=True).contiguous()
        b_out[module] = b.to(torch.float32, copy=True).mul_(scale).contiguous()

    head = build_head(base.config, len(labels))
    try:
        head.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in head_state.items()}, strict=True)
    except RuntimeError as exc:
        raise AdapterLoadError(
            "invalid", f"classification head does not fit {len(labels)} labels on this base: {exc}"
        ) from None
    head.eval()
    for parameter in head.parameters():
        parameter.requires_grad_(False)

    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in a_out}))
    size = weights_path.stat().st_size
    base_meta = meta.get("base") or {}
    logger.info("validated adapter %s from %s (r=%d, %d modules)", name, directory, rank, len(a_out))
    return AdapterWeights(
        name=name,
        labels=labels,
        task=task,
        rank=rank,
        alpha=alpha,
        target_modules=targets,
        base_id=str(base_meta.get("id", "unknown")),
        size_bytes=size,
        metadata=meta,
        path=directory,
        a=a_out,
        b=b_out,
        head=head,
    )
