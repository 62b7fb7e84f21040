"""Residency: LRU eviction at capacity, never evicting pinned, in-use or same-batch adapters."""

from __future__ import annotations

import torch
from torch import nn

from app.inference.adapter_loader import AdapterWeights
from app.inference.residency import Residency


def adapter(name: str) -> AdapterWeights:
    return AdapterWeights(
        name=name, labels=("a", "b"), task="t", rank=1, target_modules=("query",), base_id="b",
        size_bytes=1, metrics={}, path=None, a={"m": torch.zeros(1, 2)}, b={"m": torch.zeros(2, 1)},
        head=nn.Linear(2, 2),
    )


def resident(res: Residency, adapters) -> list[str]:
    return [a.name for a in adapters if res.is_resident(a)]


def test_lru_eviction_order():
    res = Residency(torch.device("cpu"), torch.float32, capacity=2)
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    res.ensure([a])
    res.ensure([b])
    res.ensure([a])  # a is now the most recent
    res.ensure([c])
    assert resident(res, [a, b, c]) == ["a", "c"]
    assert (res.loads, res.evictions) == (3, 1)


def test_pinned_and_in_use_are_never_evicted():
    res = Residency(torch.device("cpu"), torch.float32, capacity=1, pinned={"p"})
    p, busy, new = adapter("p"), adapter("busy"), adapter("new")
    res.ensure([p])
    res.acquire(busy)
    res.ensure([busy])
    res.ensure([new])
    assert resident(res, [p, busy, new]) == ["p", "busy", "new"]  # over capacity, logged, nothing lost
    res.release(busy)
    res.ensure([adapter("later")])
    assert resident(res, [p, busy, new]) == ["p"]


def test_a_batch_keeps_all_its_adapters():
    res = Residency(torch.device("cpu"), torch.float32, capacity=1)
    a, b = adapter("a"), adapter("b")
    copies = res.ensure([a, b])
    assert set(copies) == {a, b}
    assert resident(res, [a, b]) == ["a", "b"]


def test_retire_waits_for_in_use_then_frees():
    res = Residency(torch.device("cpu"), torch.float32, capacity=4)
    a = adapter("a")
    res.ensure([a])
    res.acquire(a)
    res.retire(a)
    assert res.is_resident(a)
    res.release(a)
    assert not res.is_resident(a)


def test_cpu_residency_shares_host_tensors():
    res = Residency(torch.device("cpu"), torch.float32, capacity=4)
    a = adapter("a")
    copy = res.ensure([a])[a]
    assert copy.a["m"] is a.a["m"]  # one copy in memory on the CPU
