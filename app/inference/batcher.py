"""The batch queue: admits pairs up front (bounded, fail fast), and one worker thread coalesces what is
queued into length-sorted batches for the engine, off the event loop."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.errors import InferenceFailed, Overloaded
from app.inference.adapter_loader import AdapterWeights
from app.inference.engine import EncodedPair, NLIEngine
from app.inference.heap import HeapTrimmer

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Item:
    premise: str
    hypothesis: str
    adapter: AdapterWeights
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    cancelled: bool = False

    def live(self) -> bool:
        return not self.cancelled and not self.future.cancelled()


@dataclass(frozen=True)
class QueueActivity:
    """What the queue holds now, for routers that pick a replica by it (read at scrape time)."""

    waiting_pairs: int  # admitted and not yet taken by the worker (queued, or waiting for their adapter)
    running_pairs: int  # taken by the worker and not yet answered
    waiting_adapters: tuple[str, ...]
    running_adapters: tuple[str, ...]


class BatchObserver(Protocol):
    """Told about every batch (from the worker thread): the metrics implement it."""

    def observe_batch(self, size: int, queue_waits_s: list[float]) -> None: ...
    def observe_failed_batch(self) -> None: ...


class Batcher:
    """The one owner of the queue, and of the engine's thread. Invariants: the worker thread is the
    only caller of the engine (forwards and slot moves); queued pairs plus pairs admitted while their
    adapters load never exceed `max_queue_pairs` (admission is all-or-nothing per request); every
    admitted item's future is resolved exactly once, with probabilities or with the typed error of its
    batch; items whose caller went away are dropped before each forward, not only when collected;
    no batch mixes more adapters than the device has slots for.
    """

    def __init__(
        self,
        engine: NLIEngine,
        *,
        max_batch_pairs: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue_pairs: int,
        max_queue_wait_ms: float | None = None,
        min_fill: float = 0.0,
        observer: BatchObserver | None = None,
        heap: HeapTrimmer | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.engine = engine
        self.heap = heap  # trimmed after each round, on the worker: the thread whose forwards fill it
        self.clock = clock
        self.observer = observer
        self.max_batch_pairs = max_batch_pairs
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_wait_s = max_queue_wait_ms / 1000.0 if max_queue_wait_ms else None
        self.min_fill = min_fill
        # Pairs per second of the engine over its recent batches (pairs / busy seconds, so small
        # batches do not drag the estimate down), for the wait estimate at admission.
        self.pairs_per_s: float | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=32)
        self._in_flight = 0  # pairs taken by the worker and not yet answered
        self._running_adapters: tuple[str, ...] = ()
        self._loading = 0  # pairs admitted and waiting for their adapters to load
        self._batches = 0
        self._maintenance = False
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loraswap-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, finish what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (readiness turns false if it ever ends unasked)."""
        return self._thread is not None and self._thread.is_alive()

    def activity(self) -> QueueActivity:
        with self._cond:
            return QueueActivity(
                waiting_pairs=len(self._pending) + self._loading,
                running_pairs=self._in_flight,
                waiting_adapters=tuple(sorted({item.adapter.name for item in self._pending})),
                running_adapters=self._running_adapters,
            )

    @property
    def pending_pairs(self) -> int:
        """Pairs admitted and not yet taken by the worker (queued, or waiting for their adapter)."""
        with self._cond:
            return len(self._pending) + self._loading

    def request_maintenance(self) -> None:
        """Ask the worker to free the slots of retired adapters, even if no batch comes."""
        with self._cond:
            self._maintenance = True
            self._cond.notify()

    # -- admission (event loop) --------------------------------------------------------------------
    async def submit(
        self,
        premises: Sequence[str],
        hypotheses: Sequence[str],
        adapters: Sequence[AdapterWeights] | Awaitable[Sequence[AdapterWeights]],
    ) -> list[list[float]]:
        """Admit the pairs (or refuse them whole), then answer them. `adapters` may be an awaitable of
        the per-pair adapters: the pairs are admitted and counted first, their adapters load off the
        event loop and the engine's thread, and only then do they join the queue."""
        loop = asyncio.get_running_loop()
        count = len(premises)
        with self._cond:
            try:
                self._admit(count)
            except Overloaded:
                if asyncio.iscoroutine(adapters):
                    adapters.close()  # refused: its loads never start
                raise
            self._loading += count
        try:
            resolved = adapters if isinstance(adapters, Sequence) else await adapters
        except BaseException:
            with self._cond:
                self._loading -= count
            raise
        items = [
            _Item(p, h, a, loop.create_future(), loop, 0.0) for p, h, a in zip(premises, hypotheses, resolved, strict=True)
        ]
        with self._cond:
            self._loading -= count
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after_s=5)
            now = self.clock()
            for item in items:
                item.enqueued_at = now
            self._pending.extend(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.cancelled = True
            raise

    def _admit(self, count: int) -> None:
        """Called with the lock held: refuse the request whole if it does not fit."""
        if self._stopping:
            raise Overloaded("the server is shutting down", retry_after_s=5)
        waiting = len(self._pending) + self._loading
        if count > self.max_queue_pairs - waiting:
            raise Overloaded(
                f"the queue is full ({waiting} pairs waiting); retry shortly",
                details={"queued_pairs": waiting, "max_queue_pairs": self.max_queue_pairs},
            )
        wait_s = self._estimated_wait_s()
        if wait_s is not None and self.max_queue_wait_s is not None and wait_s > self.max_queue_wait_s:
            raise Overloaded(
                f"the queue would take about {wait_s * 1e3:.0f} ms to reach this request; retry shortly",
                retry_after_s=max(1, math.ceil(wait_s)),
                details={"estimated_wait_ms": round(wait_s * 1e3), "max_queue_wait_ms": self.max_queue_wait_s * 1e3},
            )

    def _estimated_wait_s(self) -> float | None:
        """How long the pairs ahead of a new request should take (its own are not counted: a large
        request into an idle server is always admitted). Called with the lock held; unknown until
        the first batch has been timed."""
        if not self.pairs_per_s:
            return None
        return (len(self._pending) + self._loading + self._in_flight) / self.pairs_per_s

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            window = self._collect()
            if window is None:
                return
            try:
                if window:
                    self._process(window)
                else:
                    self.engine.free_retired()
                if self.heap is not None:
                    self.heap.after_batch()
            except Exception:  # never let housekeeping end the one thread that answers requests
                logger.exception("batch worker round failed")
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._running_adapters = ()

    def _collect(self) -> list[_Item] | None:
        """Wait for work; unless only one pair is queued, give latecomers `max_wait_ms` to join; then
        take what is queued (bounded).
        What it takes counts as in flight from the same lock section, so the wait estimate never
        loses sight of it."""
        with self._cond:
            while not self._pending and not self._stopping:
                if self._maintenance:
                    self._maintenance = False
                    return []  # nothing to run: the worker frees retired slots instead
                self._cond.wait()
            if not self._pending and self._stopping:
                return None
            # A lone pair goes at once: waiting would only add to its latency. With more queued there is
            # concurrent traffic, and latecomers get up to `max_wait_ms` to fill the batch.
            deadline = self._pending[0].enqueued_at + self.max_wait_s
            while 1 < len(self._pending) < self.max_batch_pairs and not self._stopping:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # Several batches' worth at most, so sorting by length has rows to choose from
            # without letting one round hold the queue for long.
            take = min(len(self._pending), self.max_batch_pairs * 4)
            window = [self._pending.popleft() for _ in range(take)]
            self._in_flight = len(window)
            self._running_adapters = tuple(sorted({item.adapter.name for item in window}))
            return [item for item in window if item.live()]

    def _process(self, items: list[_Item]) -> None:
        try:
            encoded = self.engine.encode([i.premise for i in items], [i.hypothesis for i in items])
        except Exception as exc:  # a tokenizer failure fails this round, not the worker
            logger.exception("tokenization failed for %d pairs", len(items))
            self._fail(items, exc)
            return
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
        for batch in self._split(order, encoded, [item.adapter for item in items]):
            # Filtered again per batch: a client may leave while earlier batches of its window run.
            live = [i for i in batch if items[i].live()]
            if live:
                self._run_batch([items[i] for i in live], [encoded[i] for i in live])

    def _split(
        self, order: list[int], encoded: list[EncodedPair], adapters: list[AdapterWeights]
    ) -> list[list[int]]:
        """Length-sorted rows cut into batches by pair count, padded-token budget, fill (a batch ends
        before a row that would leave less than `min_fill` of its padded tokens real: on a CPU, padding
        is paid in full, so a fuller batch beats a bigger one), and the device's slots (a batch never
        mixes more adapters than there are slots for)."""
        max_distinct = self.engine.slots.max_distinct_per_batch
        packed = self.engine.packed is not None  # no padding: only pairs and real tokens bound a batch
        batches: list[list[int]] = []
        current: list[int] = []
        distinct: set[AdapterWeights] = set()
        real_tokens = 0
        for index in order:
            longest = len(encoded[index])  # sorted ascending: the newest row is the longest
            padded = real_tokens + longest if packed else (len(current) + 1) * longest
            new_adapter = adapters[index] not in distinct
            if current and (
                len(current) >= self.max_batch_pairs
                or padded > self.max_batch_tokens
                or (not packed and real_tokens + longest < self.min_fill * padded)
                or (new_adapter and len(distinct) >= max_distinct)
            ):
                batches.append(current)
                current, real_tokens, distinct = [], 0, set()
            current.append(index)
            distinct.add(adapters[index])
            real_tokens += longest
        if current:
            batches.append(current)
        return batches

    def _run_batch(self, items: list[_Item], encoded: list[EncodedPair]) -> None:
        now = self.clock()
        try:
            probabilities = self.engine.run(encoded, [item.adapter for item in items])
            self._measure(len(items), self.clock() - now)
        except Exception as exc:
            logger.exception("batch of %d pairs failed", len(items))
            if self.observer is not None:
                self.observer.observe_failed_batch()
            self._fail(items, exc)
            return
        for item, probs in zip(items, probabilities):
            item.loop.call_soon_threadsafe(_resolve, item.future, probs)
        self._batches += 1
        if self.observer is not None:
            self.observer.observe_batch(len(items), [now - item.enqueued_at for item in items])

    def _measure(self, pairs: int, seconds: float) -> None:
        if self._batches == 0:
            return  # the first batch pays one-off warm-up costs; it would make the estimate far too slow
        self._recent.append((pairs, seconds))
        rate = sum(p for p, _ in self._recent) / max(sum(s for _, s in self._recent), 1e-6)
        with self._cond:
            self.pairs_per_s = rate

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        error = InferenceFailed(f"inference failed for this batch: {type(exc).__name__}")
        for item in items:
            item.loop.call_soon_threadsafe(_reject, item.future, error)


def _resolve(future: asyncio.Future, value: list[float]) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
