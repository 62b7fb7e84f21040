"""A padding-free forward for BERT-family encoders (BERT, RoBERTa, XLM-R): the rows of a batch are
packed end to end into one [tokens, hidden] matrix, so every Linear, LayerNorm and activation (nearly
all of the work) runs on real tokens only. Attention, the one step that needs each sequence apart,
gathers the tokens into padded blocks of sequences of similar length, runs SDPA per block, and
scatters the result back. The weights are the HF model's own modules (the LoRA wrappers included),
so the numbers match its padded forward to float rounding.

A batch no longer needs rows of similar length to be cheap: the batcher can fill it by pairs and
tokens alone, and an adapter's rows form one contiguous span, so a LoRA delta is two small GEMMs on a
slice instead of a gather and a scatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})

# A block of sequences for attention ends before a sequence that would leave less than this share of
# its padded tokens real. Attention is a small part of the work at these lengths, so a few blocks per
# batch are enough; each block costs one SDPA call per layer.
ATTENTION_BLOCK_FILL = 0.8


def packable(encoder: nn.Module, config) -> bool:
    """Whether `encoder` has the layout this forward reproduces: absolute positions, bidirectional
    self-attention only, the standard BERT layer (attention, intermediate, output)."""
    if config.model_type not in PACKABLE_MODEL_TYPES or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not layers:
        return False
    layer = layers[0]
    needed = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    try:
        for path in needed:
            layer.get_submodule(path)
    except AttributeError:
        return False
    return hasattr(encoder, "embeddings")


@dataclass(frozen=True)
class AttentionBlock:
    """Sequences of similar length attended together: `gather` [n * width] token indices into the
    packed matrix (padding points at token 0 and is masked), `mask` [n, 1, 1, width] (True: a real
    key), and `real` [real tokens] the positions of the real tokens in the flattened block. A block of
    equal-length sequences that lie next to each other in the packed matrix (a lone sequence, say) is
    a plain slice from `first`: no gather, no mask."""

    sequences: int
    width: int
    gather: torch.Tensor | None
    mask: torch.Tensor | None
    real: torch.Tensor | None
    first: int = 0


@dataclass(frozen=True)
class PackedBatch:
    """One batch laid out for the packed forward. Sequences are in batch order; `starts` [sequences]
    is where each begins in the packed matrix."""

    input_ids: torch.Tensor  # [1, tokens]
    token_type_ids: torch.Tensor | None  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens]
    starts: torch.Tensor  # [sequences]
    blocks: tuple[AttentionBlock, ...]
    unblock: torch.Tensor | None  # [tokens]: each packed token's row in the blocks' output; None: the same order


def pack(
    sequences: Sequence[Sequence[int]],
    token_types: Sequence[Sequence[int]] | None,
    *,
    position_offset: int,
    device: torch.device,
    block_fill: float = ATTENTION_BLOCK_FILL,
) -> PackedBatch:
    """Lay out `sequences` (token ids, unpadded) end to end. `position_offset`: the first position id
    (0 for BERT, padding_idx + 1 for RoBERTa, as their padded forwards count)."""
    lengths = [len(s) for s in sequences]
    starts: list[int] = []
    total = 0
    for length in lengths:
        starts.append(total)
        total += length
    ids = [token for sequence in sequences for token in sequence]
    positions = [position_offset + i for length in lengths for i in range(length)]
    types = [t for sequence in token_types for t in sequence] if token_types is not None else None

    blocks: list[AttentionBlock] = []
    block_order: list[int] = []  # packed token index of each real token, in the blocks' output order
    for members in _attention_blocks(lengths, block_fill):
        width = max(lengths[s] for s in members)
        members.sort()
        if all(lengths[s] == width for s in members) and members == list(range(members[0], members[-1] + 1)):
            first = starts[members[0]]
            blocks.append(AttentionBlock(len(members), width, None, None, None, first=first))
            block_order.extend(range(first, first + width * len(members)))
            continue
        gather = []
        real = []
        for row, s in enumerate(members):
            start, length = starts[s], lengths[s]
            gather.extend(range(start, start + length))
            gather.extend([0] * (width - length))
            real.extend(range(row * width, row * width + length))
            block_order.extend(range(start, start + length))
        mask = torch.zeros((len(members), width), dtype=torch.bool)
        for row, s in enumerate(members):
            mask[row, : lengths[s]] = True
        blocks.append(
            AttentionBlock(
                sequences=len(members),
                width=width,
                gather=torch.tensor(gather, dtype=torch.long).to(device),
                mask=mask.view(len(members), 1, 1, width).to(device),
                real=torch.tensor(real, dtype=torch.long).to(device),
            )
        )
    unblock: list[int] | None = [0] * total
    for out_row, token in enumerate(block_order):
        unblock[token] = out_row
    if block_order == list(range(total)):
        unblock = None
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long).to(device),
        token_type_ids=torch.tensor([types], dtype=torch.long).to(device) if types is not None else None,
        position_ids=torch.tensor([positions], dtype=torch.long).to(device),
        starts=torch.tensor(starts, dtype=torch.long).to(device),
        blocks=tuple(blocks),
        unblock=torch.tensor(unblock, dtype=torch.long).to(device) if unblock is not None else None,
    )


def _attention_blocks(lengths: list[int], fill: float) -> list[list[int]]:
    """Sequence indices grouped by length (ascending): a block ends before a sequence that would leave
    less than `fill` of its padded tokens real."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    blocks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for s in order:
        longest = lengths[s]
        if current and real + longest < fill * (len(current) + 1) * longest:
            blocks.append(current)
            current, real = [], 0
        current.append(s)
        real += longest
    if current:
        blocks.append(current)
    return blocks


class PackedEncoder:
    """Runs an HF BERT-family encoder (its own modules, LoRA wrappers included) on a PackedBatch.
    Returns what the classification heads read, one row per sequence: BERT's pooler output [n, hidden],
    or RoBERTa's <s> hidden state as [n, 1, hidden] (its head takes `features[:, 0, :]`)."""

    def __init__(self, encoder: nn.Module, config):
        if not packable(encoder, config):
            raise ValueError(f"{config.model_type}: not a layout the packed forward supports")
        self.encoder = encoder
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.pooler = getattr(encoder, "pooler", None)
        padding_idx = getattr(encoder.embeddings, "padding_idx", None)
        # RoBERTa counts positions from padding_idx + 1; BERT from 0.
        self.position_offset = padding_idx + 1 if config.model_type != "bert" and padding_idx is not None else 0

    def __call__(self, batch: PackedBatch, *, use_pooler: bool) -> torch.Tensor:
        types = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(batch.input_ids)
        hidden = self.encoder.embeddings(
            input_ids=batch.input_ids, token_type_ids=types, position_ids=batch.position_ids
        )[0]  # [tokens, hidden]
        for layer in self.encoder.encoder.layer:
            hidden = self._layer(layer, hidden, batch)
        first = hidden.index_select(0, batch.starts)  # [sequences, hidden]
        if not use_pooler:
            return first.unsqueeze(1)
        return self.pooler.activation(self.pooler.dense(first))

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        attention = layer.attention
        query = attention.self.query(hidden)
        key = attention.self.key(hidden)
        value = attention.self.value(hidden)
        context = self._attend(query, key, value, batch)
        hidden = attention.output.LayerNorm(attention.output.dense(context) + hidden)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
        return layer.output.LayerNorm(layer.output.dense(inner) + hidden)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        heads, size = self.heads, self.head_size
        outputs = []
        for block in batch.blocks:
            n, width = block.sequences, block.width

            def split(x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [n, heads, width, size]
                rows = x.narrow(0, block.first, n * width) if block.gather is None else x.index_select(0, block.gather)
                return rows.view(n, width, heads, size).transpose(1, 2)

            context = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=block.mask)
            context = context.transpose(1, 2).reshape(n * width, heads * size)
            outputs.append(context if block.real is None else context.index_select(0, block.real))
        stacked = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return stacked if batch.unblock is None else stacked.index_select(0, batch.unblock)
