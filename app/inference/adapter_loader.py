"""Read and validate one adapter directory eagerly, so a bad adapter fails at load time, never on a
request: metadata, base fingerprint, label set, PEFT config, checksums, safetensors only, shapes, finite
values; then copy its weights into host memory of its own (`HostSlab`).

A server with more adapters than its host tier reloads evicted ones all the time (1,000 adapters, a host
tier of 64, Zipf traffic: about one load per two requests), on loader threads that share the GIL and
the cores with the engine. So a reload does only what the files' changes call for: checksums are
remembered per file identity (`ChecksumMemo`), the weights file is read once (hashed and parsed from the
same bytes), and the checks run once over each slab, not per tensor (r16 on the embedded base, a loop
of 300 reloads on one torch thread: 2.6-2.7 ms of CPU each, from 4.3-5.5 ms).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import mmap
import os
import re
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from torch import nn

from app.artifacts import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterMetadata,
    sha256_tag,
    sha256_tag_of,
)
from app.inference.base_model import build_head

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_PREFIX = "base_model.model."
# PEFT options that change the math; an adapter that uses one is refused rather than served wrong.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
}
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# transformers' placeholder label names (LABEL_0, ...): a config that has only these names no labels.
PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")
LABELS_HOW_TO = (
    "give them in metadata.json, as id2label in a config.json beside the adapter, "
    'or in the load request: PUT /adapters/{name} {"path": ..., "labels": ["entailment", ...]}'
)


class AdapterLoadError(Exception):
    """Why an adapter cannot be served. `kind` is `not_found` (nothing usable at the path) or
    `invalid` (files present but wrong for this base)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must match: the served base's fingerprint, the names it answers to (for PEFT
    adapters that carry only `base_model_name_or_path`), and its LoRA-able modules."""

    fingerprint: str
    model_type: str
    base_model_prefix: str
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    config: Any  # the base's PretrainedConfig, to build heads
    names: frozenset[str] = frozenset()


FileIdentity = tuple[int, int, int, int, int]


def file_identity(stat: os.stat_result) -> FileIdentity:
    """(device, inode, size, mtime_ns, ctime_ns): what changes when a file is written, replaced (a
    rename over it) or touched. ctime cannot be set from user space, so even a write that restores
    the old size and mtime changes it. The same test git's index uses to skip re-hashing."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class ChecksumMemo:
    """Files' sha256 tags, kept while each file's identity is unchanged: a changed file is a miss and is
    hashed again. The identity is taken before (or from the same open file as) the bytes are hashed,
    so a change during the read only costs a miss later, never a stale answer. A bounded LRU of
    (path, identity) keys, about 0.3 KB each; safe from any thread."""

    def __init__(self, capacity: int = 8192):
        self.capacity = capacity
        self._tags: OrderedDict[tuple[str, FileIdentity], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, identity: FileIdentity) -> str | None:
        key = (str(path), identity)
        with self._lock:
            tag = self._tags.get(key)
            if tag is not None:
                self._tags.move_to_end(key)
            return tag

    def put(self, path: Path, identity: FileIdentity, tag: str) -> None:
        with self._lock:
            self._tags[(str(path), identity)] = tag
            while len(self._tags) > self.capacity:
                self._tags.popitem(last=False)


# One per process: keyed by path and identity, whichever engine reads the file.
CHECKSUMS = ChecksumMemo()


class HostSlab:
    """One anonymous private memory mapping holding all the tensors of one adapter's part, back to back.

    Why not malloc: adapters are allocated by the loader threads and freed on host eviction in LRU
    order, between the activations of every forward. glibc raises its mmap threshold after the first
    free of a large mmapped block, so adapter-sized blocks then land in the heaps of the loader threads'
    arenas, and the holes evictions leave are rarely given back (one process serving 1,000 r64
    adapters through a host tier of 64: after 1,200 requests malloc held 159 MB free, and growing). A
    slab is unmapped, exactly its bytes, when the last tensor viewing it is gone; activations keep
    malloc's heap.

    The tensors are `torch.frombuffer` views: each one keeps the mapping alive, so a request or a
    device slot that still holds any of them (the head, shared by CPU slots) keeps the whole slab.

    A fresh mapping costs a zero fill of every page by the kernel (r64 on the embedded base: 616 page
    faults and about 1 ms of a 6-7 ms load), and in steady state every load is paid for by one
    eviction. So when the last view of a slab goes, its mapping is kept as a spare for the next slab
    of the same size. At most `SPARES` are kept, the most recently freed (an older one is unmapped):
    the LoRA and head mappings of two adapters, as many loads as the default two loader threads run
    at once; the memory held beyond the host tier is at most that.
    """

    SPARES = 4
    _spares: deque[mmap.mmap] = deque(maxlen=SPARES)

    def __init__(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32):
        counts = [math.prod(shape) for shape in shapes]
        self.nbytes = sum(counts) * dtype.itemsize
        if self.nbytes:
            memory = self._spare(self.nbytes)
            if memory is None:
                # MAP_PRIVATE: plain anonymous memory (RssAnon), not the shared memory mmap's default gives.
                memory = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE)
            view = memoryview(memory)
            weakref.finalize(view, HostSlab._spares.append, memory)  # runs once no tensor views it
            flat = torch.frombuffer(view, dtype=dtype, count=sum(counts))  # [elements], keeps `view`
        else:
            flat = torch.empty(0, dtype=dtype)
        self.flat = flat  # every element, in one 1-D view (one check over the whole slab)
        self.tensors: list[torch.Tensor] = []
        offset = 0
        for shape, count in zip(shapes, counts):
            self.tensors.append(flat[offset : offset + count].view(tuple(shape)))
            offset += count

    @classmethod
    def _spare(cls, nbytes: int) -> mmap.mmap | None:
        """A kept mapping of exactly `nbytes`, taken out of the spares (any thread; no lock: deque
        operations are atomic, and a spare another thread took first is simply not found)."""
        for memory in list(cls._spares):
            if len(memory) == nbytes:
                try:
                    cls._spares.remove(memory)
                except ValueError:
                    continue
                return memory
        return None

    @classmethod
    def drop_spares(cls) -> None:
        """Unmap the kept spares (their memory goes back to the kernel)."""
        cls._spares.clear()


@dataclass(eq=False)
class AdapterWeights:
    """One loaded adapter on the host. Immutable once built; requests hold a reference to it, so a
    replaced or unloaded adapter stays valid for the batches that still use it."""

    name: str
    labels: tuple[str, ...]
    task: str
    rank: int
    target_modules: tuple[str, ...]
    base_id: str
    size_bytes: int
    metrics: dict[str, float]
    path: Path
    a: dict[str, torch.Tensor] = field(repr=False)  # module path -> [r, in]
    b: dict[str, torch.Tensor] = field(repr=False)  # module path -> [out, r], scaled
    head: nn.Module = field(repr=False)


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
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterLoadError("invalid", f"{CONFIG_FILE} is missing (a PEFT adapter directory has one)")


def read_metadata(directory: Path) -> AdapterMetadata | None:
    """Our metadata.json, if the directory has one (a plain PEFT directory has none)."""
    if not (directory / METADATA_FILE).is_file():
        return None
    try:
        return AdapterMetadata.read(directory)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'metadata'}: {e['msg']}" for e in exc.errors())
        raise AdapterLoadError("invalid", f"{METADATA_FILE} is not valid: {problems}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterLoadError("invalid", f"{METADATA_FILE} is not valid JSON: {exc}") from None


def _checksum(path: Path, weights: WeightsFile) -> str:
    """`sha256:<hex>` of a file, computed once per version of it (`CHECKSUMS`). The weights file is
    hashed from the bytes that are parsed, so what was checked is what is served."""
    identity = weights.identity if path == weights.path else file_identity(path.stat())
    cached = CHECKSUMS.get(path, identity)
    if cached is None:
        cached = sha256_tag_of(weights.data) if path == weights.path else sha256_tag(path)
        CHECKSUMS.put(path, identity, cached)
    return cached


@dataclass(frozen=True)
class WeightsFile:
    """The weights file's bytes and the identity of the version they were read from."""

    path: Path
    identity: FileIdentity
    data: bytes

    @property
    def size(self) -> int:
        return self.identity[2]


def _read_weights(path: Path) -> WeightsFile:
    """The whole file, read through one open descriptor: its identity (fstat) first, then its bytes."""
    try:
        with open(path, "rb") as handle:
            identity = file_identity(os.fstat(handle.fileno()))
            data = handle.read()
    except OSError as exc:
        raise AdapterLoadError("invalid", f"{WEIGHTS_FILE} cannot be read: {exc}") from None
    return WeightsFile(path, identity, data)


def _check_metadata(meta: AdapterMetadata, directory: Path, base: BaseInfo, weights: WeightsFile) -> None:
    if meta.method != "lora":
        raise AdapterLoadError("invalid", f"method {meta.method!r} is not a LoRA adapter")
    if meta.base.fingerprint != base.fingerprint:
        trained_on = meta.base.display or meta.base.id
        raise AdapterLoadError(
            "invalid",
            f"adapter was trained on another base ({trained_on}, fingerprint "
            f"{meta.base.fingerprint[:19]}...), not the served one ({base.fingerprint[:19]}...)",
        )
    for file_name, checksum in meta.files.items():
        target = directory / file_name
        if not target.is_file():
            raise AdapterLoadError("invalid", f"metadata lists {file_name!r}, which is not in the adapter directory")
        if _checksum(target, weights) != checksum:
            raise AdapterLoadError("invalid", f"{file_name} does not match its sha256 in {METADATA_FILE}")


def _labels_from_model_config(directory: Path) -> tuple[str, ...] | None:
    """Label names from `config.json`'s id2label, unless it has only transformers' placeholders."""
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        return None
    id2label = _read_json(path).get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        ordered = [id2label[key] for key in sorted(id2label, key=int)]
    except (ValueError, TypeError):
        raise AdapterLoadError("invalid", f"{MODEL_CONFIG_FILE} id2label keys must be integers 0..n-1") from None
    if sorted(int(k) for k in id2label) != list(range(len(ordered))):
        raise AdapterLoadError("invalid", f"{MODEL_CONFIG_FILE} id2label keys must be integers 0..n-1")
    if all(isinstance(x, str) and PLACEHOLDER_LABEL.fullmatch(x) for x in ordered):
        return None
    return tuple(str(x) for x in ordered)


def _check_labels(labels: Sequence[str], source: str) -> tuple[str, ...]:
    if (
        len(labels) < 2
        or not all(isinstance(x, str) and x.strip() for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise AdapterLoadError("invalid", f"labels ({source}) must be at least two distinct non-empty strings")
    return tuple(labels)


def _resolve_labels(
    meta: AdapterMetadata | None, directory: Path, given: Sequence[str] | None
) -> tuple[tuple[str, ...], str]:
    """Labels in precedence order: our metadata, the directory's id2label, the load request."""
    if meta is not None:
        found, source = tuple(meta.labels), METADATA_FILE
    else:
        found, source = _labels_from_model_config(directory), f"{MODEL_CONFIG_FILE} id2label"
    if found is not None:
        if given is not None and tuple(given) != found:
            raise AdapterLoadError(
                "invalid", f"the labels given ({', '.join(given)}) differ from the adapter's {source} ({', '.join(found)})"
            )
        return _check_labels(found, source), source
    if given is not None:
        return _check_labels(given, "the load request"), "the load request"
    raise AdapterLoadError("invalid", f"the adapter carries no label names: {LABELS_HOW_TO}")


def _check_peft_base(config: dict[str, Any], base: BaseInfo) -> None:
    """Without our metadata (no fingerprint), the PEFT config's base name must be one the served base
    answers to; the shape checks that follow catch the rest."""
    declared = config.get("base_model_name_or_path")
    if declared and base.names and str(declared) not in base.names:
        raise AdapterLoadError(
            "invalid",
            f"adapter_config.json says it was made for base {declared!r}; this server serves "
            f"{' / '.join(sorted(base.names))}",
        )


def _check_peft_config(config: dict[str, Any]) -> tuple[int, float]:
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
    return rank, scale


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


def _copy_lora(
    lora_a: dict[str, torch.Tensor], lora_b: dict[str, torch.Tensor], scale: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fp32 copies of the LoRA matrices (B pre-scaled) in one slab, every value finite (checked after
    scaling, once over the slab: torch.isfinite per tensor cost 1.2 ms a load here, numpy's over the
    slab 0.03 ms)."""
    modules = list(lora_a)
    slab = HostSlab([lora_a[m].shape for m in modules] + [lora_b[m].shape for m in modules])
    a_out = dict(zip(modules, slab.tensors[: len(modules)]))  # module -> [r, in]
    b_out = dict(zip(modules, slab.tensors[len(modules) :]))  # module -> [out, r]
    for module in modules:
        a_out[module].copy_(lora_a[module])
        b_out[module].copy_(lora_b[module]).mul_(scale)
    if not _all_finite(slab):
        bad = next(m for m in modules if not (torch.isfinite(a_out[m]).all() and torch.isfinite(b_out[m]).all()))
        raise AdapterLoadError("invalid", f"{bad}: LoRA weights contain NaN or infinity (or overflow when scaled)")
    return a_out, b_out


def _all_finite(slab: HostSlab) -> bool:
    return bool(np.isfinite(slab.flat.numpy()).all())


# Empty heads on the meta device, one per (base, label count): a copy of one is cheaper than a new one.
_head_templates: dict[tuple[str, int], nn.Module] = {}


def _empty_head(base: BaseInfo, num_labels: int) -> nn.Module:
    key = (base.fingerprint, num_labels)
    template = _head_templates.get(key)
    if template is None:  # two threads may both build it; either copy is right
        with torch.device("meta"):
            template = _head_templates[key] = build_head(base.config, num_labels)
    return copy.deepcopy(template)


def _build_head(
    base: BaseInfo, labels: tuple[str, ...], label_source: str, state: dict[str, torch.Tensor]
) -> nn.Module:
    """The adapter's classification head, its parameters in a slab of their own (on CUDA the engine
    replaces the LoRA matrices by pinned copies, and their slab goes; the head's stays). Built on the
    meta device: no random weights are allocated only to be overwritten."""
    head = _empty_head(base, len(labels))
    keys = list(state)
    slab = HostSlab([state[k].shape for k in keys])
    copies = dict(zip(keys, slab.tensors))
    for key in keys:
        copies[key].copy_(state[key])
    if not _all_finite(slab):
        raise AdapterLoadError("invalid", "classification head weights contain NaN or infinity")
    try:
        head.load_state_dict(copies, strict=True, assign=True)
    except RuntimeError as exc:
        raise AdapterLoadError(
            "invalid",
            f"classification head does not fit {len(labels)} labels (from {label_source}) on this base: {exc}",
        ) from None
    head.eval()
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head


def load_adapter(
    name: str, directory: Path, base: BaseInfo, labels: Sequence[str] | None = None
) -> AdapterWeights:
    """Everything that can be wrong with an adapter raises AdapterLoadError here. `labels` come from the
    load request, for a plain PEFT directory that names none."""
    directory = Path(directory)
    _check_files(directory)
    weights = _read_weights(directory / WEIGHTS_FILE)
    meta = read_metadata(directory)
    if meta is not None:
        _check_metadata(meta, directory, base, weights)
    peft_config = _read_json(directory / CONFIG_FILE)
    if meta is None:
        _check_peft_base(peft_config, base)
    resolved_labels, label_source = _resolve_labels(meta, directory, labels)
    rank, scale = _check_peft_config(peft_config)

    try:
        # Tensors of their own (parsed out of the bytes read), never views of a file mapping: a view would
        # keep the mapping alive and change, or crash the process, if the file changed.
        tensors = safetensors.torch.load(weights.data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise AdapterLoadError("invalid", f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None

    lora_a, lora_b, head_state = _split_tensors(tensors, base)
    size_bytes = weights.size
    del tensors, weights
    for module, a in lora_a.items():
        b = lora_b[module]
        in_features, out_features = base.linear_shapes[module]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterLoadError(
                "invalid",
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit r={rank} "
                f"on a {in_features}->{out_features} layer",
            )
    a_out, b_out = _copy_lora(lora_a, lora_b, scale)
    head = _build_head(base, resolved_labels, label_source, head_state)

    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in a_out}))
    logger.info("validated adapter %s from %s (r=%d, %d modules)", name, directory, rank, len(a_out))
    return AdapterWeights(
        name=name,
        labels=resolved_labels,
        task=meta.task if meta is not None else "unknown",
        rank=rank,
        target_modules=targets,
        base_id=meta.base.id if meta is not None else str(peft_config.get("base_model_name_or_path") or "unknown"),
        size_bytes=size_bytes,
        metrics=meta.numeric_metrics() if meta is not None else {},
        path=directory,
        a=a_out,
        b=b_out,
        head=head,
    )
