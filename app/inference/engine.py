"""The NLI engine: tokenize pairs, run ONE forward of the frozen base with per-row LoRA deltas, and
apply each adapter's own classification head to its rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.inference.adapter_loader import AdapterLoadError, AdapterWeights, BaseInfo, load_adapter
from app.inference.base_model import (
    EMBEDDED_BASE,
    EMBEDDED_BASE_ID,
    BaseSpec,
    build_classifier,
    encoder_of,
    fingerprint,
    load_tokenizer,
)
from app.inference.lora import LoRAContext, ModuleDelta, Segment, Span, wrap_linear_layers
from app.inference.packed import PackedEncoder, pack, packable
from app.inference.slots import DeviceSlots

logger = logging.getLogger(__name__)

# Batches mixing at most this many adapters run per-adapter segments at each adapter's own rank;
# more run the gathered (BGMV) layout padded to the slots' maximum rank. On the 2-core CPU segments were
# as fast or 4-7% faster up to 16 adapters a batch, at slot ranks 16 and 64 (`python -m
# benchmarks.lora_layouts`, docs/benchmarks.md); with the default 16 slots a batch never mixes more.
SEGMENTED_MAX_ADAPTERS = 16


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized pair, unpadded."""

    input_ids: list[int]
    token_type_ids: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class NLIEngine:
    """Holds the frozen base (never modified, never merged into) and runs batches for any mix of adapters.

    Invariant: `run` is only ever called from one thread at a time (the batcher's worker); the
    LoRA context and the slot moves rely on it.
    """

    def __init__(
        self,
        spec: BaseSpec,
        *,
        device: str = "auto",
        max_seq_len: int = 256,
        max_resident: int = 16,
        max_rank: int = 64,
        pinned: set[str] | None = None,
        segmented_max_adapters: int = SEGMENTED_MAX_ADAPTERS,
        packed: bool = True,
    ):
        self.spec = spec
        self.device = pick_device(device)
        self.dtype = self._dtype_for(self.device)
        self.max_seq_len = max_seq_len
        self.tokenizer = load_tokenizer(spec)
        model = build_classifier(spec, num_labels=2)
        model.eval()
        # The fingerprint is taken in fp32 on the host, as training records it, before any cast.
        self.fingerprint = fingerprint(model)
        self.config = model.config
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as exc:  # an architecture without SDPA keeps eager attention
            logger.info("SDPA attention unavailable (%s); using eager attention", exc)
        self.encoder = encoder_of(model)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.encoder.to(self.device, self.dtype)
        self.context = LoRAContext()
        self.wrapped = wrap_linear_layers(self.encoder, self.context)
        self.base_info = BaseInfo(
            fingerprint=self.fingerprint,
            model_type=self.config.model_type,
            base_model_prefix=model.base_model_prefix,
            linear_shapes={name: (m.in_features, m.out_features) for name, m in self.wrapped.items()},
            config=self.config,
            names=_base_names(spec, self.config),
        )
        self.slots = DeviceSlots(
            self.device,
            self.dtype,
            capacity=max_resident,
            max_rank=max_rank,
            linear_shapes=self.base_info.linear_shapes,
            pinned=pinned,
        )
        self.segmented_max_adapters = segmented_max_adapters
        self.uses_pooler = self.config.model_type == "bert"
        # The padding-free forward where the architecture allows it (BERT, RoBERTa, XLM-R); else HF's padded one.
        self.packed = PackedEncoder(self.encoder, self.config) if packed and packable(self.encoder, self.config) else None
        self.pad_id = self.tokenizer.pad_token_id
        logger.info(
            "base %s loaded on %s (%s), %d LoRA-able layers", spec.display_id, self.device, self.dtype, len(self.wrapped)
        )

    @staticmethod
    def _dtype_for(device: torch.device) -> torch.dtype:
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    # -- adapters --------------------------------------------------------------------------------
    def read_adapter(self, name: str, path, labels=None) -> AdapterWeights:
        """Read and validate an adapter for this base (host memory; pinned when the device is CUDA)."""
        adapter = load_adapter(name, path, self.base_info, labels)
        if adapter.rank > self.slots.max_rank:
            raise AdapterLoadError(
                "invalid",
                f"rank {adapter.rank} is over the device slots' maximum of {self.slots.max_rank} "
                "(LORASWAP_MAX_LORA_RANK)",
            )
        if self.device.type == "cuda":
            for store in (adapter.a, adapter.b):
                for key, tensor in store.items():
                    store[key] = tensor.pin_memory()
        return adapter

    # -- tokenization ----------------------------------------------------------------------------
    def encode(self, premises: list[str], hypotheses: list[str]) -> list[EncodedPair]:
        encoded = self.tokenizer(premises, hypotheses, truncation=True, max_length=self.max_seq_len)
        types = encoded.get("token_type_ids")
        return [
            EncodedPair(ids, types[i] if types is not None else None) for i, ids in enumerate(encoded["input_ids"])
        ]

    # -- the forward -----------------------------------------------------------------------------
    def run(self, pairs: list[EncodedPair], adapters: list[AdapterWeights]) -> list[list[float]]:
        """Class probabilities for each pair under its own adapter, in input order."""
        if len(pairs) != len(adapters):
            raise ValueError("one adapter per pair")
        distinct = list(dict.fromkeys(adapters))
        if self.packed is not None:
            return self._run_packed(pairs, adapters, distinct)
        with torch.inference_mode():
            slot_of = self.slots.place(distinct)
            rows_of = {adapter: [i for i, a in enumerate(adapters) if a is adapter] for adapter in distinct}
            inputs = self._pad(pairs)
            self.context.deltas = self._deltas(adapters, rows_of, slot_of)
            try:
                outputs = self.encoder(**inputs)
            finally:
                self.context.deltas = None
            # BERT's heads read the (shared, frozen) pooler output; RoBERTa's read the <s> token.
            features = outputs.pooler_output if self.uses_pooler else outputs.last_hidden_state
            probabilities: list[list[float] | None] = [None] * len(pairs)
            for adapter, rows in rows_of.items():
                index = torch.tensor(rows, device=self.device)
                logits = self.slots.heads[slot_of[adapter]](features.index_select(0, index))  # [rows, labels]
                probs = F.softmax(logits.float(), dim=-1).cpu().tolist()
                for row, p in zip(rows, probs):
                    probabilities[row] = p
        return probabilities  # type: ignore[return-value]

    def _run_packed(
        self, pairs: list[EncodedPair], adapters: list[AdapterWeights], distinct: list[AdapterWeights]
    ) -> list[list[float]]:
        """The padding-free forward: rows grouped by adapter, so each adapter's tokens (and, for the
        pooler, its sequences) are one contiguous span of the packed batch."""
        rows_of = {adapter: [i for i, a in enumerate(adapters) if a is adapter] for adapter in distinct}
        order = [row for rows in rows_of.values() for row in rows]
        sequences = [pairs[row].input_ids for row in order]
        types = [pairs[row].token_type_ids for row in order] if pairs[0].token_type_ids is not None else None
        with torch.inference_mode():
            slot_of = self.slots.place(distinct)
            batch = pack(sequences, types, position_offset=self.packed.position_offset, device=self.device)
            token_spans: dict[AdapterWeights, tuple[int, int]] = {}
            row_spans: dict[AdapterWeights, tuple[int, int]] = {}
            token, row = 0, 0
            for adapter, rows in rows_of.items():
                tokens = sum(len(pairs[r]) for r in rows)
                token_spans[adapter] = (token, token + tokens)
                row_spans[adapter] = (row, row + len(rows))
                token, row = token + tokens, row + len(rows)
            self.context.deltas = self._span_deltas(token_spans, row_spans, slot_of)
            try:
                features = self.packed(batch, use_pooler=self.uses_pooler)  # one row per sequence, in `order`
            finally:
                self.context.deltas = None
            probabilities: list[list[float] | None] = [None] * len(pairs)
            for adapter, (start, stop) in row_spans.items():
                logits = self.slots.heads[slot_of[adapter]](features[start:stop])  # [rows, labels]
                probs = F.softmax(logits.float(), dim=-1).cpu().tolist()
                for original, p in zip(order[start:stop], probs):
                    probabilities[original] = p
        return probabilities  # type: ignore[return-value]

    def _span_deltas(
        self,
        token_spans: dict[AdapterWeights, tuple[int, int]],
        row_spans: dict[AdapterWeights, tuple[int, int]],
        slot_of: dict[AdapterWeights, int],
    ) -> dict[str, ModuleDelta]:
        """Per wrapped module, each adapter's contiguous span: of tokens, or of sequences for the pooler."""
        deltas: dict[str, ModuleDelta] = {}
        for module in set().union(*(adapter.a.keys() for adapter in token_spans)):
            spans = row_spans if module in POOLER_MODULES else token_spans
            deltas[module] = ModuleDelta(
                self.slots.a[module],
                self.slots.b[module],
                spans=[
                    Span(*spans[adapter], slot_of[adapter], adapter.rank) for adapter in spans if module in adapter.a
                ],
            )
        return deltas

    def free_retired(self) -> int:
        """Empty the slots of unloaded, replaced or evicted adapters (worker thread)."""
        return self.slots.free_retired()

    def _pad(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        longest = max(len(p) for p in pairs)
        ids = torch.full((len(pairs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        types = torch.zeros((len(pairs), longest), dtype=torch.long) if pairs[0].token_type_ids is not None else None
        for i, pair in enumerate(pairs):
            n = len(pair)
            ids[i, :n] = torch.tensor(pair.input_ids)
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(pair.token_type_ids)
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            batch["token_type_ids"] = types.to(self.device)
        return batch

    def _deltas(
        self,
        row_adapters: list[AdapterWeights],
        rows_of: dict[AdapterWeights, list[int]],
        slot_of: dict[AdapterWeights, int],
    ) -> dict[str, ModuleDelta]:
        slots = self.slots
        modules = set().union(*(adapter.a.keys() for adapter in rows_of))
        deltas: dict[str, ModuleDelta] = {}
        if len(rows_of) > self.segmented_max_adapters:
            row_slot = torch.tensor([slot_of[a] for a in row_adapters], device=self.device)  # [batch]
            for module in modules:
                deltas[module] = ModuleDelta(slots.a[module], slots.b[module], row_slot=row_slot)
            return deltas
        whole = len(rows_of) == 1
        segments = {
            adapter: (None if whole else torch.tensor(rows, device=self.device), slot_of[adapter])
            for adapter, rows in rows_of.items()
        }
        for module in modules:
            deltas[module] = ModuleDelta(
                slots.a[module],
                slots.b[module],
                segments=[
                    Segment(rows, slot, adapter.rank)
                    for adapter, (rows, slot) in segments.items()
                    if module in adapter.a
                ],
            )
        return deltas


# Modules that run on one row per sequence (BERT's pooler) rather than one per token.
POOLER_MODULES = frozenset({"pooler.dense"})


def _base_names(spec: BaseSpec, config) -> frozenset[str]:
    """The names a PEFT adapter's `base_model_name_or_path` may give for this base."""
    names = {spec.name, spec.source, getattr(config, "_name_or_path", "") or spec.name}
    if spec.name == EMBEDDED_BASE:
        names |= {EMBEDDED_BASE_ID, EMBEDDED_BASE_ID.split("/")[-1]}
    return frozenset(n for n in names if n)


__all__ = ["NLIEngine", "EncodedPair", "AdapterLoadError", "pick_device"]
