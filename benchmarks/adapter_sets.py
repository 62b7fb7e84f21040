"""The adapters a benchmark serves: the shipped ones where they fit the base, else synthetic ones.

Synthetic adapters are written through PEFT once per label set and cloned from that template with
fresh random weights, which keeps 100 adapters of roberta-large's size cheap to make."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.artifacts import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, AdapterMetadata, sha256_tag, write_json_atomic
from app.inference.base_model import BaseSpec, build_classifier, fingerprint

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO_ROOT / "adapters"
SHIPPED_NAMES = ("mnli", "snli", "rte")
NLI_LABELS = ("entailment", "neutral", "contradiction")
RTE_LABELS = ("entailment", "not_entailment")
# Synthetic stand-ins mirror the shipped set: rte is two-way, which matters to the PEFT baseline
# (its classification heads then differ in shape).
STAND_IN_LABELS = {"mnli": NLI_LABELS, "snli": NLI_LABELS, "rte": RTE_LABELS}


@dataclass(frozen=True)
class AdapterSet:
    """K adapter directories, all in `root` (what LORASWAP_ADAPTERS_DIR points at), most popular first."""

    root: Path
    names: list[str]
    kind: str  # "shipped", "synthetic", or "shipped+synthetic"

    def path(self, name: str) -> Path:
        return self.root / name

    def labels(self, name: str) -> tuple[str, ...]:
        return tuple(AdapterMetadata.read(self.root / name).labels)


def shipped_adapters_fit(base_fingerprint: str, names: tuple[str, ...] = SHIPPED_NAMES) -> bool:
    """True when every shipped adapter is present, complete, and was trained on this exact base."""
    for name in names:
        directory = SHIPPED_DIR / name
        try:
            meta = AdapterMetadata.read(directory)
        except (OSError, ValueError):
            return False
        if not (directory / WEIGHTS_FILE).is_file() or meta.base.fingerprint != base_fingerprint:
            return False
    return True


def write_metadata(directory: Path, meta: dict) -> None:
    """metadata.json from a plain dict, `files` recomputed over the weights and config now in `directory`.
    For benchmark-only artifacts that AdapterMetadata does not describe (a head-only adapter with no
    LoRA target modules, see benchmarks/merged_base.py); the server reads them leniently."""
    meta = {**meta, "files": {f: sha256_tag(directory / f) for f in (WEIGHTS_FILE, CONFIG_FILE)}}
    write_json_atomic(directory / METADATA_FILE, meta)


def clone_with_random_weights(template: Path, output: Path, *, name: str, seed: int, scale: float = 0.02) -> Path:
    """A new adapter of the template's exact shapes and configs, every tensor redrawn at random."""
    output.mkdir(parents=True, exist_ok=True)
    meta = AdapterMetadata.read(template)
    generator = torch.Generator().manual_seed(seed)
    with safe_open(str(template / WEIGHTS_FILE), framework="pt") as handle:
        file_metadata = handle.metadata()
        tensors = {
            key: (torch.randn(handle.get_slice(key).get_shape(), generator=generator) * scale).contiguous()
            for key in handle.keys()
        }
    save_file(tensors, str(output / WEIGHTS_FILE), metadata=file_metadata)
    (output / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600
    for file_name in meta.files:
        if file_name != WEIGHTS_FILE:
            shutil.copy(template / file_name, output / file_name)
    note = f"random weights (seed {seed}, scale {scale}); cloned from {template.name}; not trained"
    meta.model_copy(
        update={"name": name, "training": {"note": note}, "files": AdapterMetadata.checksums(output, list(meta.files))}
    ).write(output)
    return output


def write_synthetic(
    spec: BaseSpec,
    root: Path,
    names: list[str],
    *,
    labels_for: dict[str, tuple[str, ...]] | None = None,
    rank: int = 16,
    base_fingerprint: str | None = None,
    seed: int = 0,
) -> None:
    """Random adapters named `names` under `root`: PEFT writes one template per label set, the
    others are clones of it."""
    from training.synthetic_adapter import write_random_adapter

    labels_for = labels_for or {}
    if base_fingerprint is None:
        base_fingerprint = fingerprint(build_classifier(spec, num_labels=3))
    templates: dict[tuple[str, ...], Path] = {}
    for i, name in enumerate(names):
        labels = labels_for.get(name, NLI_LABELS)
        if labels not in templates:
            templates[labels] = write_random_adapter(
                spec, root / name, name=name, labels=labels, rank=rank, seed=seed + i, base_fingerprint=base_fingerprint
            )
        else:
            clone_with_random_weights(templates[labels], root / name, name=name, seed=seed + i)
    logger.info("wrote %d synthetic adapters under %s", len(names), root)


def prepare_adapters(spec: BaseSpec, count: int, root: Path, *, base_fingerprint: str, rank: int = 16) -> AdapterSet:
    """`count` adapters under `root`. The shipped mnli/snli/rte come first when they fit the base
    (copied, so the server's adapter directory holds exactly these K); synthetic ones fill the rest.
    On the embedded base without the shipped ones, synthetic stand-ins named mnli/snli/rte (rte
    two-way) take their place; on any other base every adapter is synthetic (synth-000, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    shipped = shipped_adapters_fit(base_fingerprint)
    if shipped or spec.name == "embedded":
        head = list(SHIPPED_NAMES[: min(count, len(SHIPPED_NAMES))])
    else:
        head = []
    rest = [f"synth-{i:03d}" for i in range(count - len(head))]
    if shipped:
        for name in head:
            shutil.copytree(SHIPPED_DIR / name, root / name, dirs_exist_ok=True)
        to_write = rest
    else:
        if head:
            logger.warning("shipped adapters missing or trained on another base: using synthetic stand-ins")
        to_write = head + rest
    if to_write:
        write_synthetic(spec, root, to_write, labels_for=STAND_IN_LABELS, rank=rank, base_fingerprint=base_fingerprint)
    kind = ("shipped" if not rest else "shipped+synthetic") if shipped else "synthetic"
    return AdapterSet(root=root, names=head + rest, kind=kind)
