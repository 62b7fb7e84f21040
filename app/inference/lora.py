"""Per-row LoRA deltas inside the frozen base: each wrapped Linear adds, for every row of the batch,
the delta of the adapter that row asked for, with batched matmuls and no Python loop over rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModuleDelta:
    """The LoRA matrices one wrapped Linear needs for one batch, in one of three layouts:

    - single: every row uses one adapter; `a` [r, in], `b` [out, r].
    - stacked (few adapters): the adapters' matrices side by side, `a` [R, in], `b` [out, R] with
      R the sum of their ranks, and `column_mask` [batch, 1, R] keeping, for each row, only its own
      adapter's columns. Two plain GEMMs for the whole batch, whatever the mix.
    - gathered (many adapters, where R would make those GEMMs costly): `a` [slots, r, in],
      `b` [slots, out, r] padded to the largest rank, `row_slot` [batch] picks each row's slot, and
      batched matmuls apply them; slot 0 is zeros for rows whose adapter skips this module.
    `b` is pre-scaled by alpha / r (alpha / sqrt(r) for rsLoRA), so the forward never rescales.
    """

    a: torch.Tensor
    b: torch.Tensor
    column_mask: torch.Tensor | None = None
    row_slot: torch.Tensor | None = None


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
        out = self.base(x)  # [batch, seq, out] or [batch, out]
        deltas = self.context.deltas
        delta = deltas.get(self.name) if deltas else None
        if delta is None:
            return out
        if delta.row_slot is None:
            low = x @ delta.a.transpose(0, 1)  # [batch, seq, R] (or [batch, R])
            if delta.column_mask is not None:
                low = low * (delta.column_mask if x.dim() == 3 else delta.column_mask.squeeze(1))
            return out + low @ delta.b.transpose(0, 1)
        rows = x if x.dim() == 3 else x.unsqueeze(1)  # [batch, seq, in]
        a_rows = delta.a.index_select(0, delta.row_slot)  # [batch, r, in]
        b_rows = delta.b.index_select(0, delta.row_slot)  # [batch, out, r]
        low = torch.bmm(rows, a_rows.transpose(1, 2))  # [batch, seq, r]
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
