"""Per-row LoRA deltas inside the frozen base: each wrapped Linear adds, for every row of the batch,
the delta of the adapter that row asked for, with batched matmuls and no Python loop over rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Segment:
    """The rows of one adapter in a batch: `rows` [n] (None: every row), its `slot` and `rank`."""

    rows: torch.Tensor | None
    slot: int
    rank: int


@dataclass
class Span:
    """The rows `start:stop` of one adapter in a batch whose rows are grouped by adapter (the packed
    forward's layout), its `slot` and `rank`."""

    start: int
    stop: int
    slot: int
    rank: int


@dataclass
class ModuleDelta:
    """What one wrapped Linear needs for one batch: the slot buffers, `a` [slots, r_max, in] and `b`
    [slots, out, r_max] (`b` pre-scaled by alpha / r, or alpha / sqrt(r) for rsLoRA), and which rows use
    which slot, in one of three layouts:

    - segments: per adapter of the batch, its rows and its own rank (no padding): two small GEMMs per
      adapter on views of its slot, added back with index_add. Cheap when few adapters share a batch.
    - row_slot [batch]: each row's slot; the slots' matrices are gathered per row, padded to r_max, and
      applied with batched matmuls (BGMV). No Python loop, but r_max columns for every row.
    - spans: rows grouped by adapter (the packed forward), so each adapter's rows are one contiguous
      slice: two small GEMMs per adapter added in place, no gather or scatter.
    Rows whose adapter does not target this module are in no segment (and read zeros when gathered).
    """

    a: torch.Tensor
    b: torch.Tensor
    segments: list[Segment] | None = None
    row_slot: torch.Tensor | None = None
    spans: list[Span] | None = None


class LoRAContext:
    """The deltas of the batch being run. Owned by the engine's single worker thread: it is set
    before one forward and cleared after, so the wrapped modules never see two batches at once."""

    def __init__(self) -> None:
        self.deltas: dict[str, ModuleDelta] | None = None


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus the per-row LoRA delta of the current batch, if any."""

    def __init__(self, base: nn.Linear, name: str, context: LoRAContext):
        super().__init__()
        self.base = base
        self.name = name
        self.context = context

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in] or [batch, in] (pooler)
        # The base's own F.linear, not a second Module call: every Linear of the encoder is wrapped, and
        # each call's Python runs on the engine thread, holding the GIL the event loop also needs.
        out = F.linear(x, self.base.weight, self.base.bias)  # [batch, seq, out] or [batch, out]
        deltas = self.context.deltas
        delta = deltas.get(self.name) if deltas else None
        if delta is None:
            return out
        if delta.spans is not None:  # x: [rows, in], rows grouped by adapter
            for span in delta.spans:
                a = delta.a[span.slot, : span.rank]  # [r, in]
                b = delta.b[span.slot, :, : span.rank]  # [out, r]
                out[span.start : span.stop].addmm_(x[span.start : span.stop] @ a.transpose(0, 1), b.transpose(0, 1))
            return out
        if delta.segments is not None:
            for segment in delta.segments:
                a = delta.a[segment.slot, : segment.rank]  # [r, in], a view of the slot
                b = delta.b[segment.slot, :, : segment.rank]  # [out, r]
                if segment.rows is None:
                    out = out + (x @ a.transpose(0, 1)) @ b.transpose(0, 1)
                else:
                    rows = x.index_select(0, segment.rows)  # [n, seq, in]
                    out = out.index_add(0, segment.rows, (rows @ a.transpose(0, 1)) @ b.transpose(0, 1))
            return out
        rows = x if x.dim() == 3 else x.unsqueeze(1)  # [batch, seq, in]
        a_rows = delta.a.index_select(0, delta.row_slot)  # [batch, r_max, in]
        b_rows = delta.b.index_select(0, delta.row_slot)  # [batch, out, r_max]
        low = torch.bmm(rows, a_rows.transpose(1, 2))  # [batch, seq, r_max]
        return out + torch.bmm(low, b_rows.transpose(1, 2)).view_as(out)


def wrap_linear_layers(encoder: nn.Module, context: LoRAContext) -> dict[str, MultiLoRALinear]:
    """Wrap every nn.Linear of the encoder (the modules LoRA can target; embeddings are not Linear).

    Returns the wrappers by their dotted path relative to the encoder, e.g.
    `encoder.layer.0.attention.self.query` — the same path PEFT writes in its weight names.
    """
    wrapped: dict[str, MultiLoRALinear] = {}
    targets = [
        (name, module)
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name)
        wrapper = MultiLoRALinear(module, name, context)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
