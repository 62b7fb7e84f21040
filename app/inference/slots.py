"""The device tier: a fixed number of adapter slots. For every wrapped Linear an adapter targets, one pair
of buffers is allocated once (`[slots, r_max, in]` and `[slots, out, r_max]`, as vLLM does); an adapter
moves in by copying its matrices into a slot, and a batch carries only which slot each row uses.

Invariants: only the engine's worker thread moves adapters in or out and touches the buffers;
`retire` (any thread) only marks an adapter, and the worker frees its slot before the next batch;
pinned adapters are never evicted, and neither is an adapter of the batch being placed.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict

import torch
from torch import nn

from app.inference.adapter_loader import AdapterWeights

logger = logging.getLogger(__name__)


class SlotsFull(RuntimeError):
    """A batch needs more slots than are free of pinned adapters (the batcher never forms one)."""


class DeviceSlots:
    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        *,
        capacity: int,
        max_rank: int,
        linear_shapes: dict[str, tuple[int, int]],
        pinned: set[str] | None = None,
    ):
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.max_rank = max_rank
        self.pinned = frozenset(pinned or ())
        self._shapes = linear_shapes
        self._lock = threading.Lock()  # guards the bookkeeping read by other threads
        self.a: dict[str, torch.Tensor] = {}  # module -> [slots, r_max, in], allocated on first use
        self.b: dict[str, torch.Tensor] = {}  # module -> [slots, out, r_max], pre-scaled
        self.heads: list[nn.Module | None] = [None] * capacity
        self.modules: list[frozenset[str]] = [frozenset()] * capacity
        self.ranks: list[int] = [0] * capacity  # rows (of A) / columns (of B) written in each slot
        self._slot_of: OrderedDict[AdapterWeights, int] = OrderedDict()  # LRU order, oldest first
        self._retired: set[AdapterWeights] = set()
        self.moves_in = 0
        self.evictions = 0

    # -- any thread ------------------------------------------------------------------------------
    @property
    def max_distinct_per_batch(self) -> int:
        """Adapters one batch may mix: every slot but those pinned adapters may hold."""
        return max(1, self.capacity - len(self.pinned))

    def is_resident(self, adapter: AdapterWeights) -> bool:
        with self._lock:
            return adapter in self._slot_of and adapter not in self._retired

    def is_pinned(self, name: str) -> bool:
        return name in self.pinned

    def retire(self, adapter: AdapterWeights) -> None:
        """The adapter was unloaded, replaced or evicted from the host: free its slot (worker, later)."""
        with self._lock:
            if adapter in self._slot_of:
                self._retired.add(adapter)

    def counters(self) -> tuple[int, int, int]:
        """(adapters in slots now, moves onto the device, evictions), for the metrics."""
        with self._lock:
            return len(self._slot_of) - len(self._retired), self.moves_in, self.evictions

    def bytes_held(self) -> int:
        """Device bytes of the slot buffers and of the heads now in slots."""
        tensors = [*self.a.values(), *self.b.values()]
        tensors += [t for head in self.heads if head is not None for t in head.state_dict().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- worker thread only -------------------------------------------------------------------------
    def free_retired(self) -> int:
        """Empty the slots of retired adapters; returns how many were freed."""
        with self._lock:
            retired, self._retired = self._retired, set()
            slots = [self._slot_of.pop(a) for a in retired if a in self._slot_of]
        # The buffers were made under inference mode (inside a forward): they may only change under it.
        with torch.inference_mode():
            for slot in slots:
                self._clear(slot)
        return len(slots)

    def place(self, adapters: list[AdapterWeights]) -> dict[AdapterWeights, int]:
        """Slot of every adapter of a batch, moving the missing ones in (evicting least recently used)."""
        self.free_retired()
        if len(adapters) > self.capacity:
            raise SlotsFull(f"a batch of {len(adapters)} adapters does not fit {self.capacity} slots")
        placed: dict[AdapterWeights, int] = {}
        for adapter in adapters:
            with self._lock:
                slot = self._slot_of.get(adapter)
                if slot is not None:
                    self._slot_of.move_to_end(adapter)
            if slot is None:
                slot = self._free_slot(keep=set(adapters))
                self._move_in(adapter, slot)
            placed[adapter] = slot
        return placed

    def _free_slot(self, keep: set[AdapterWeights]) -> int:
        with self._lock:
            used = set(self._slot_of.values())
            for slot in range(self.capacity):
                if slot not in used:
                    return slot
            for adapter, slot in self._slot_of.items():  # oldest first
                if adapter not in keep and adapter.name not in self.pinned:
                    del self._slot_of[adapter]
                    self.evictions += 1
                    return slot
        raise SlotsFull("every slot holds a pinned adapter or one of this batch")

    def _move_in(self, adapter: AdapterWeights, slot: int) -> None:
        non_blocking = self.device.type == "cuda"  # from pinned host memory
        if not (self.modules[slot] <= frozenset(adapter.a) and self.ranks[slot] <= adapter.rank):
            self._clear(slot)  # else the copies below overwrite everything the last occupant wrote
        # One call for all of the adapter's matrices (A and B of q and v on 6 layers: 24 copies), so one
        # GIL hand-back per move, not one per copy: 0.39 against 0.58 ms per r16 move alone. Moves were 10%
        # of the engine thread's py-spy samples at 1,000 adapters under Zipf, GIL waits included.
        targets, sources = [], []
        for module, a in adapter.a.items():
            a_buffer, b_buffer = self._buffers(module)
            targets += [a_buffer[slot, : adapter.rank], b_buffer[slot, :, : adapter.rank]]
            sources += [a, adapter.b[module]]
        if targets:
            torch._foreach_copy_(targets, sources, non_blocking=non_blocking)
        self.heads[slot] = self._device_head(adapter.head)
        self.modules[slot] = frozenset(adapter.a)
        self.ranks[slot] = adapter.rank
        with self._lock:
            self._slot_of[adapter] = slot
            self.moves_in += 1
        logger.debug("adapter %s moved into slot %d", adapter.name, slot)

    def _device_head(self, head: nn.Module) -> nn.Module:
        """The head on the device. Heads are frozen and only read, so where the host copy already has the
        device's dtype (the CPU in fp32) the slot shares it instead of holding a second copy."""
        parameter = next(head.parameters(), None)
        if parameter is not None and parameter.device == self.device and parameter.dtype == self.dtype:
            return head
        return copy.deepcopy(head).to(self.device, self.dtype)

    def _clear(self, slot: int) -> None:
        # Zeroed so that the padded (gathered) layout reads exact zeros past an adapter's rank. Only what
        # the occupant wrote: the rest of the slot is zero already (an r16 adapter in r_max 64 slots
        # dirties a quarter of them).
        rank = self.ranks[slot]
        written = [t for m in self.modules[slot] for t in (self.a[m][slot, :rank], self.b[m][slot, :, :rank])]
        if written:
            torch._foreach_zero_(written)  # one call, as in _move_in
        self.modules[slot] = frozenset()
        self.ranks[slot] = 0
        self.heads[slot] = None

    def _buffers(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        if module not in self.a:
            in_features, out_features = self._shapes[module]
            self.a[module] = torch.zeros(
                (self.capacity, self.max_rank, in_features), device=self.device, dtype=self.dtype
            )
            self.b[module] = torch.zeros(
                (self.capacity, out_features, self.max_rank), device=self.device, dtype=self.dtype
            )
        return self.a[module], self.b[module]
