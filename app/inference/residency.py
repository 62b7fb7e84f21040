"""Which adapters sit on the device now: an LRU of device copies with pinning and in-use counts.

On the CPU the "device copy" is the host tensors themselves (no second copy, so a resident
adapter costs its size once); on CUDA it is a bf16 copy moved from pinned host memory.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from app.inference.adapter_loader import AdapterWeights

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DeviceAdapter:
    a: dict[str, torch.Tensor]  # module -> [r, in] on the device
    b: dict[str, torch.Tensor]  # module -> [out, r] on the device, scaled
    head: nn.Module


class Residency:
    """Invariants: at most `capacity` adapters are resident, except when every resident one is pinned
    or used by a queued or running batch (those are never evicted; the overflow is logged); only the
    engine's worker thread moves adapters in or out, while acquire/release may come from any thread.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int, pinned: set[str] | None = None):
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.pinned = set(pinned or ())
        self._lock = threading.Lock()
        self._resident: OrderedDict[AdapterWeights, DeviceAdapter] = OrderedDict()
        self._in_use: Counter[AdapterWeights] = Counter()
        self._retired: set[AdapterWeights] = set()
        self.loads = 0
        self.evictions = 0

    # -- bookkeeping, any thread -------------------------------------------------------------
    def acquire(self, adapter: AdapterWeights, count: int = 1) -> None:
        with self._lock:
            self._in_use[adapter] += count

    def release(self, adapter: AdapterWeights, count: int = 1) -> None:
        with self._lock:
            self._in_use[adapter] -= count
            if self._in_use[adapter] <= 0:
                del self._in_use[adapter]
                if adapter in self._retired:
                    self._retired.discard(adapter)
                    self._resident.pop(adapter, None)

    def retire(self, adapter: AdapterWeights) -> None:
        """The adapter was unloaded or replaced: free its device copy once no batch uses it."""
        with self._lock:
            if self._in_use.get(adapter, 0) > 0:
                self._retired.add(adapter)
            else:
                self._resident.pop(adapter, None)

    def is_resident(self, adapter: AdapterWeights) -> bool:
        with self._lock:
            return adapter in self._resident

    def is_pinned(self, name: str) -> bool:
        return name in self.pinned

    def counters(self) -> tuple[int, int, int]:
        """(resident now, moves onto the device, evictions), for the metrics."""
        with self._lock:
            return len(self._resident), self.loads, self.evictions

    # -- moves, worker thread only ------------------------------------------------------------
    def ensure(self, adapters: list[AdapterWeights]) -> dict[AdapterWeights, DeviceAdapter]:
        """Make every adapter of a batch resident (moving in the missing ones) and return their copies."""
        result: dict[AdapterWeights, DeviceAdapter] = {}
        for adapter in adapters:
            with self._lock:
                copy_on_device = self._resident.get(adapter)
                if copy_on_device is not None:
                    self._resident.move_to_end(adapter)
            if copy_on_device is None:
                copy_on_device = self._move_in(adapter)
                with self._lock:
                    self._resident[adapter] = copy_on_device
                    self._evict_over_capacity(keep=set(adapters))
            result[adapter] = copy_on_device
        return result

    def _move_in(self, adapter: AdapterWeights) -> DeviceAdapter:
        started = time.perf_counter()
        if self.device.type == "cpu" and self.dtype == torch.float32:
            moved = DeviceAdapter(a=adapter.a, b=adapter.b, head=adapter.head)
        else:
            non_blocking = self.device.type == "cuda"
            moved = DeviceAdapter(
                a={k: v.to(self.device, self.dtype, non_blocking=non_blocking) for k, v in adapter.a.items()},
                b={k: v.to(self.device, self.dtype, non_blocking=non_blocking) for k, v in adapter.b.items()},
                head=copy.deepcopy(adapter.head).to(self.device, self.dtype),
            )
        elapsed = time.perf_counter() - started
        self.loads += 1
        logger.debug("adapter %s moved to %s in %.1f ms", adapter.name, self.device, elapsed * 1e3)
        return moved

    def _evict_over_capacity(self, keep: set[AdapterWeights]) -> None:
        # Called with the lock held. Oldest first; never pinned, never in use, never in this batch.
        overflow = len(self._resident) - self.capacity
        if overflow <= 0:
            return
        for adapter in list(self._resident):
            if overflow <= 0:
                break
            if adapter in keep or adapter.name in self.pinned or self._in_use.get(adapter, 0) > 0:
                continue
            del self._resident[adapter]
            self.evictions += 1
            overflow -= 1
        if overflow > 0:
            logger.warning(
                "%d adapters resident, over the capacity of %d: the rest are pinned or in use",
                len(self._resident),
                self.capacity,
            )
