"""The batcher: coalescing, input order, admission control (adapters loading included), failures and
cancellations, the device's slots, draining. Synchronised with events, never with sleeps or windows."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.errors import InferenceFailed, Overloaded
from app.inference.batcher import Batcher
from app.inference.engine import EncodedPair


class FakeSlots:
    def __init__(self, max_distinct: int):
        self.max_distinct_per_batch = max_distinct


class FakeEngine:
    """Encodes a pair as len(premise) tokens; answers [len(premise), adapter id]; can block or fail."""

    def __init__(self, max_distinct: int = 8, packed: bool = False):
        self.slots = FakeSlots(max_distinct)
        self.packed = object() if packed else None  # the engine's padding-free forward, when it has one
        self.freed = threading.Event()
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: str | None = None

    def encode(self, premises, hypotheses):
        return [EncodedPair(list(range(len(p))), None) for p in premises]

    def run(self, pairs, adapters):
        self.entered.set()
        self.gate.wait(10)
        names = [a.name for a in adapters]
        self.batches.append(names)
        if self.fail_on in names:
            raise RuntimeError("injected")
        return [[float(len(p)), float(a.ident)] for p, a in zip(pairs, adapters)]

    def free_retired(self):
        self.freed.set()
        return 0


class CountingObserver:
    def __init__(self):
        self.sizes, self.failed = [], 0

    def observe_batch(self, size, queue_waits_s):
        self.sizes.append(size)

    def observe_failed_batch(self):
        self.failed += 1


class Tag:
    def __init__(self, name, ident):
        self.name, self.ident = name, ident


A, B, C = Tag("a", 1), Tag("b", 2), Tag("c", 3)


def make(engine, **kw):
    # A long window: a batch goes when max_batch_pairs have come (tests send enough), never on a timer.
    options = dict(max_batch_pairs=4, max_batch_tokens=10_000, max_wait_ms=60_000, max_queue_pairs=100)
    options.update(kw)
    batcher = Batcher(engine, **options)
    batcher.start()
    return batcher


def test_concurrent_requests_are_coalesced_in_order():
    engine = FakeEngine()
    batcher = make(engine)

    async def main():
        return await asyncio.gather(
            batcher.submit(["x" * 5, "x" * 1], ["h", "h"], [A, B]),
            batcher.submit(["x" * 3], ["h"], [B]),
            batcher.submit(["x" * 2, "x" * 9], ["h", "h"], [A, A]),
        )

    results = asyncio.run(main())
    batcher.stop()
    assert results == [[[5.0, 1.0], [1.0, 2.0]], [[3.0, 2.0]], [[2.0, 1.0], [9.0, 1.0]]]
    assert sum(len(b) for b in engine.batches) == 5
    assert all(len(b) <= 4 for b in engine.batches)
    assert len(engine.batches) == 2  # five pairs, at most four a batch


def test_split_sorts_by_length_and_respects_budgets():
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch_pairs=3, max_batch_tokens=20, max_wait_ms=0, max_queue_pairs=10)
    encoded = [EncodedPair([0] * n, None) for n in (9, 1, 8, 2, 3, 10)]
    order = sorted(range(6), key=lambda i: len(encoded[i]))
    batches = batcher._split(order, encoded, [A] * 6)
    assert batches == [[1, 3, 4], [2, 0], [5]]  # 3 pairs max; then 2x9=18 fits 20 tokens, 3x10 does not


def test_split_keeps_batches_mostly_real_tokens():
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch_pairs=8, max_batch_tokens=10_000, max_wait_ms=0, max_queue_pairs=10, min_fill=0.9)
    encoded = [EncodedPair([0] * n, None) for n in (10, 10, 11, 30, 31, 32)]
    batches = batcher._split(list(range(6)), encoded, [A] * 6)
    assert batches == [[0, 1, 2], [3, 4, 5]]  # 30 after three rows of ~10 would be 2/3 padding


def test_split_for_a_packing_engine_counts_real_tokens_and_ignores_fill():
    # No padding in the packed forward: rows of 10 and 30 tokens batch together, up to the token budget.
    batcher = Batcher(
        FakeEngine(packed=True), max_batch_pairs=8, max_batch_tokens=100, max_wait_ms=0, max_queue_pairs=10, min_fill=0.9
    )
    encoded = [EncodedPair([0] * n, None) for n in (10, 10, 11, 30, 31, 32)]
    batches = batcher._split(list(range(6)), encoded, [A] * 6)
    assert batches == [[0, 1, 2, 3, 4], [5]]  # 10+10+11+30+31 = 92 real tokens; +32 is over 100
    padding = Batcher(FakeEngine(), max_batch_pairs=8, max_batch_tokens=100, max_wait_ms=0, max_queue_pairs=10, min_fill=0.9)
    assert padding._split(list(range(6)), encoded, [A] * 6) == [[0, 1, 2], [3, 4, 5]]  # padded: fill and 3x32 tokens


def test_a_lone_pair_goes_at_once_while_several_wait_to_fill():
    """The batch window (here a minute) applies only when more than one pair is queued."""
    engine = FakeEngine()
    batcher = make(engine, max_batch_pairs=4, max_wait_ms=60_000)

    async def main():
        alone = await asyncio.wait_for(batcher.submit(["xx"], ["h"], [A]), timeout=10)
        # Two pairs: the worker waits for two more (max_batch_pairs) or the window; two more come.
        together = await asyncio.gather(
            batcher.submit(["x", "xxx"], ["h", "h"], [A, B]), batcher.submit(["x" * 4, "x" * 5], ["h", "h"], [B, C])
        )
        return alone, together

    alone, together = asyncio.run(main())
    batcher.stop()
    assert alone == [[2.0, 1.0]]
    assert together == [[[1.0, 1.0], [3.0, 2.0]], [[4.0, 2.0], [5.0, 3.0]]]
    assert [len(b) for b in engine.batches] == [1, 4]


def test_split_never_mixes_more_adapters_than_the_slots_hold():
    batcher = Batcher(FakeEngine(max_distinct=2), max_batch_pairs=8, max_batch_tokens=10_000, max_wait_ms=0, max_queue_pairs=10)
    encoded = [EncodedPair([0] * 5, None) for _ in range(6)]
    batches = batcher._split(list(range(6)), encoded, [A, B, A, C, B, C])
    assert batches == [[0, 1, 2], [3, 4, 5]]  # C would be a third adapter beside A and B


def test_full_queue_fails_fast_with_retry_after():
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_queue_pairs=3, max_batch_pairs=1, max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.submit(["a"], ["h"], [A]))
        await asyncio.to_thread(engine.entered.wait, 5)  # the worker holds one pair
        queued = asyncio.ensure_future(batcher.submit(["b", "c"], ["h", "h"], [A, A]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as caught:
            await batcher.submit(["d", "e"], ["h", "h"], [A, A])
        assert caught.value.retry_after_s >= 1
        engine.gate.set()
        return await first, await queued

    first, queued = asyncio.run(main())
    batcher.stop()
    assert first == [[1.0, 1.0]] and queued == [[1.0, 1.0], [1.0, 1.0]]


def test_failed_batch_fails_its_members_and_the_worker_goes_on():
    engine = FakeEngine()
    engine.fail_on = "b"
    observer = CountingObserver()
    batcher = make(engine, max_batch_pairs=2, observer=observer)

    async def main():
        bad = await asyncio.gather(batcher.submit(["aa", "bb"], ["h", "h"], [A, B]), return_exceptions=True)
        engine.fail_on = None
        good = await batcher.submit(["aa", "cc"], ["h", "h"], [A, C])
        return bad, good

    bad, good = asyncio.run(main())
    batcher.stop()
    assert isinstance(bad[0], InferenceFailed)
    assert good == [[2.0, 1.0], [2.0, 3.0]]
    assert observer.failed == 1 and observer.sizes == [2]


def test_cancelled_request_never_reaches_the_engine():
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_pairs=1, max_wait_ms=0)

    async def main():
        blocker = asyncio.ensure_future(batcher.submit(["first"], ["h"], [A]))
        await asyncio.to_thread(engine.entered.wait, 5)
        gone = asyncio.ensure_future(batcher.submit(["gone"], ["h"], [B]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        engine.gate.set()
        await blocker
        return await batcher.submit(["after"], ["h"], [A])

    assert asyncio.run(main()) == [[5.0, 1.0]]
    batcher.stop()
    assert ["b"] not in engine.batches


def test_a_request_cancelled_while_an_earlier_batch_of_its_window_runs_never_reaches_the_engine():
    engine = FakeEngine()
    engine.gate.clear()
    # Both requests land in one window (two pairs); fill splits it into a short and a long batch.
    batcher = make(engine, max_batch_pairs=2, min_fill=0.9)

    async def main():
        short = asyncio.ensure_future(batcher.submit(["s"], ["h"], [A]))
        long = asyncio.ensure_future(batcher.submit(["l" * 50], ["h"], [B]))
        await asyncio.to_thread(engine.entered.wait, 5)  # the short batch is running; the long one waits
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        engine.gate.set()
        return await short

    assert asyncio.run(main()) == [[1.0, 1.0]]
    batcher.stop()
    assert engine.batches == [["a"]]


def test_pairs_waiting_for_their_adapter_are_admitted_and_counted_then_queued():
    engine = FakeEngine()
    batcher = make(engine, max_queue_pairs=3, max_batch_pairs=2)
    loaded = threading.Event()

    async def adapters_after_load():
        await asyncio.to_thread(loaded.wait, 5)  # an adapter loading off the event loop
        return [A, A]

    async def main():
        waiting = asyncio.ensure_future(batcher.submit(["x", "y"], ["h", "h"], adapters_after_load()))
        await asyncio.sleep(0)
        assert batcher.pending_pairs == 2  # admitted while loading, counted by admission
        with pytest.raises(Overloaded):
            await batcher.submit(["a", "b"], ["h", "h"], [B, B])  # 2 + 2 > 3
        refused = adapters_after_load()
        with pytest.raises(Overloaded):
            await batcher.submit(["a", "b"], ["h", "h"], refused)  # refused: its load never starts
        loaded.set()
        return await waiting

    assert asyncio.run(main()) == [[1.0, 1.0], [1.0, 1.0]]
    assert batcher.pending_pairs == 0
    batcher.stop()


def test_a_failed_adapter_load_releases_its_admission():
    engine = FakeEngine()
    batcher = make(engine, max_queue_pairs=2)

    async def failing():
        raise Overloaded("stand-in for an adapter that fails to load")

    async def main():
        with pytest.raises(Overloaded):
            await batcher.submit(["x", "y"], ["h", "h"], failing())
        return batcher.pending_pairs

    assert asyncio.run(main()) == 0
    batcher.stop()


def test_maintenance_runs_on_the_worker_when_idle():
    engine = FakeEngine()
    batcher = make(engine)
    batcher.request_maintenance()
    assert engine.freed.wait(5)
    batcher.stop()


def test_stop_answers_what_is_queued_then_refuses():
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_batch_pairs=1, max_wait_ms=0)

    async def main():
        pending = [asyncio.ensure_future(batcher.submit([f"p{i}"], ["h"], [A])) for i in range(3)]
        await asyncio.to_thread(engine.entered.wait, 5)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop))
        while not batcher._stopping:  # wait until stop() has begun
            await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(["late"], ["h"], [A])
        engine.gate.set()
        await stopper
        return await asyncio.gather(*pending)

    assert asyncio.run(main()) == [[[2.0, 1.0]], [[2.0, 1.0]], [[2.0, 1.0]]]


def test_estimated_wait_over_the_bound_is_refused_up_front():
    engine = FakeEngine()
    engine.gate.clear()
    batcher = make(engine, max_queue_wait_ms=50, max_batch_pairs=1, max_wait_ms=0)
    batcher.pairs_per_s = 100.0  # as if measured: 10 ms a pair

    async def main():
        # Into an empty queue even a request longer than the bound is admitted: nothing is ahead of it.
        accepted = asyncio.ensure_future(batcher.submit(["a"] * 8, ["h"] * 8, [A] * 8))  # 80 ms of work
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as caught:
            await batcher.submit(["d"], ["h"], [A])  # 80 ms ahead of it > 50 ms
        engine.gate.set()
        return caught.value, await accepted

    refused, accepted = asyncio.run(main())
    batcher.stop()
    assert refused.details["estimated_wait_ms"] == 80 and refused.retry_after_s >= 1
    assert len(accepted) == 8
    assert batcher.pairs_per_s is not None and batcher.pairs_per_s > 0


def test_a_failing_housekeeping_round_does_not_end_the_worker_and_alive_says_so():
    engine = FakeEngine()

    def broken_free():
        engine.freed.set()
        raise RuntimeError("injected")

    engine.free_retired = broken_free
    batcher = make(engine, max_batch_pairs=1)
    batcher.request_maintenance()
    assert engine.freed.wait(5)
    assert asyncio.run(batcher.submit(["ab"], ["h"], [A])) == [[2.0, 1.0]]  # still answering
    assert batcher.alive
    batcher.stop()
    assert not batcher.alive
