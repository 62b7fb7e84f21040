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
from app.inference.lora import LoRAContext, ModuleDelta, wrap_linear_layers
from app.inference.residency import DeviceAdapter, Residency

logger = logging.getLogger(__name__)

# Side-by-side LoRA matrices are used while their summed rank stays under an eighth of the layer's
# width (or this floor): beyond that, the extra GEMM columns cost more than gathering per row.
STACKED_RANK_FLOOR = 64
STACKED_WIDTH_DIVISOR = 8


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
    LoRA context and the residency moves rely on it.
    """

    def __init__(
        self,
        spec: BaseSpec,
        *,
        device: str = "auto",
        max_seq_len: int = 256,
        max_resident: int = 16,
        pinned: set[str] | None = None,
    ):
        self.spec = spec
        self.device = pick_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
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
        self.residency = Residency(self.device, self.dtype, max_resident, pinned)
        self.uses_pooler = self.config.model_type == "bert"
        self.pad_id = self.tokenizer.pad_token_id
        logger.info(
            "base %s loaded on %s (%s), %d LoRA-able layers", spec.display_id, self.device, self.dtype, len(self.wrapped)
        )

    # -- adapters --------------------------------------------------------------------------------
    def read_adapter(self, name: str, path, labels=None) -> AdapterWeights:
        """Read and validate an adapter for this base (host memory; pinned when the device is CUDA)."""
        adapter = load_adapter(name, path, self.base_info, labels)
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
        with torch.inference_mode():
            on_device = self.residency.ensure(distinct)
            inputs = self._pad(pairs)
            self.context.deltas = self._deltas(adapters, distinct, on_device)
            try:
                outputs = self.encoder(**inputs)
            finally:
                self.context.deltas = None
            # BERT's heads read the (shared, frozen) pooler output; RoBERTa's read the <s> token.
            features = outputs.pooler_output if self.uses_pooler else outputs.last_hidden_state
            probabilities: list[list[float] | None] = [None] * len(pairs)
            for adapter in distinct:
                rows = [i for i, a in enumerate(adapters) if a is adapter]
                index = torch.tensor(rows, device=self.device)
                logits = on_device[adapter].head(features.index_select(0, index))  # [rows, labels]
                probs = F.softmax(logits.float(), dim=-1).cpu().tolist()
                for row, p in zip(rows, probs):
                    probabilities[row] = p
        return probabilities  # type: ignore[return-value]

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
        distinct: list[AdapterWeights],
        on_device: dict[AdapterWeights, DeviceAdapter],
    ) -> dict[str, ModuleDelta]:
        modules = set().union(*(on_device[a].a.keys() for a in distinct))
        if len(distinct) == 1:
            only = on_device[distinct[0]]
            return {m: ModuleDelta(only.a[m], only.b[m]) for m in modules}
        index_of = {adapter: i for i, adapter in enumerate(distinct)}
        row_index = torch.tensor([index_of[a] for a in row_adapters], device=self.device)  # [batch]
        deltas: dict[str, ModuleDelta] = {}
        for module in modules:
            present = [a for a in distinct if module in on_device[a].a]
            total_rank = sum(a.rank for a in present)
            in_features, out_features = self.base_info.linear_shapes[module]
            if total_rank <= max(STACKED_RANK_FLOOR, min(in_features, out_features) // STACKED_WIDTH_DIVISOR):
                deltas[module] = self._stacked(module, present, index_of, row_index, on_device)
            else:
                deltas[module] = self._gathered(module, present, index_of, row_index, on_device)
        return deltas

    def _stacked(self, module, present, index_of, row_index, on_device) -> ModuleDelta:
        a = torch.cat([on_device[x].a[module] for x in present], dim=0)  # [R, in]
        b = torch.cat([on_device[x].b[module] for x in present], dim=1)  # [out, R]
        owner = torch.tensor(
            [index_of[x] for x in present for _ in range(x.rank)], device=self.device
        )  # [R]: which adapter each column belongs to
        mask = (row_index[:, None] == owner[None, :]).to(self.dtype).unsqueeze(1)  # [batch, 1, R]
        return ModuleDelta(a, b, column_mask=mask)

    def _gathered(self, module, present, index_of, row_index, on_device) -> ModuleDelta:
        in_features, out_features = self.base_info.linear_shapes[module]
        rank = max(x.rank for x in present)
        a = torch.zeros((len(present) + 1, rank, in_features), device=self.device, dtype=self.dtype)
        b = torch.zeros((len(present) + 1, out_features, rank), device=self.device, dtype=self.dtype)
        slot_of_index = torch.zeros(len(index_of), dtype=torch.long)
        for slot, adapter in enumerate(present, start=1):
            a[slot, : adapter.rank] = on_device[adapter].a[module]
            b[slot, :, : adapter.rank] = on_device[adapter].b[module]
            slot_of_index[index_of[adapter]] = slot
        row_slot = slot_of_index.to(self.device).index_select(0, row_index)  # [batch]
        return ModuleDelta(a, b, row_slot=row_slot)


def _base_names(spec: BaseSpec, config) -> frozenset[str]:
    """The names a PEFT adapter's `base_model_name_or_path` may give for this base."""
    names = {spec.name, spec.source, getattr(config, "_name_or_path", "") or spec.name}
    if spec.name == EMBEDDED_BASE:
        names |= {EMBEDDED_BASE_ID, EMBEDDED_BASE_ID.split("/")[-1]}
    return frozenset(n for n in names if n)


__all__ = ["NLIEngine", "EncodedPair", "AdapterLoadError", "pick_device"]
