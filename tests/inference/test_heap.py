"""The heap trimmer: when it trims (growth past the slack, measured from where the last trim or the
lowest point left the resident set), that it is off where it cannot work, that real glibc gives freed
heap pages back through it, and that the batch worker calls it after each round on its own thread."""

from __future__ import annotations

import asyncio
import ctypes
import platform
import threading

import pytest

from app.inference.heap import HeapTrimmer, glibc_malloc_trim, resident_bytes
from tests.inference.test_batcher import A, FakeEngine, make

MIB = 2**20


class FakeProcess:
    """A resident set the test sets, and a trim that drops it to `after_trim` (and records the thread)."""

    def __init__(self, rss: int):
        self.rss, self.after_trim, self.trim_threads = rss, rss, []

    def read(self) -> int:
        return self.rss

    def trim(self) -> None:
        self.trim_threads.append(threading.current_thread().name)
        self.rss = self.after_trim


def test_trims_only_once_growth_passes_the_slack_and_counts_what_came_back():
    process = FakeProcess(500 * MIB)
    heap = HeapTrimmer(32 * MIB, rss=process.read, trim=process.trim)
    process.rss = 532 * MIB  # exactly the slack: not over it
    assert heap.after_batch() is False
    process.rss, process.after_trim = 540 * MIB, 505 * MIB
    assert heap.after_batch() is True
    assert (heap.trims, heap.released_bytes) == (1, 35 * MIB)
    process.rss = 530 * MIB  # 25 MiB over the new level of 505: no trim
    assert heap.after_batch() is False
    process.rss, process.after_trim = 538 * MIB, 506 * MIB  # 33 over 505
    assert heap.after_batch() is True
    assert (heap.trims, heap.released_bytes) == (2, 67 * MIB)
    assert len(process.trim_threads) == 2


def test_the_level_follows_the_resident_set_down():
    # An adapter evicted from the host tier unmaps its slab: growth is measured from the lower point.
    process = FakeProcess(600 * MIB)
    heap = HeapTrimmer(32 * MIB, rss=process.read, trim=process.trim)
    process.rss = 560 * MIB
    assert heap.after_batch() is False
    process.rss = 600 * MIB  # 40 over 560, though not over the starting 600 + 32
    assert heap.after_batch() is True


@pytest.mark.parametrize(
    "slack, trim, rss",
    [(0, "fake", 500 * MIB), (32 * MIB, None, 500 * MIB), (32 * MIB, "fake", None)],
    ids=["slack-zero", "no-malloc-trim", "no-proc"],
)
def test_off_where_it_cannot_or_should_not_trim(slack, trim, rss):
    calls = []
    heap = HeapTrimmer(slack, rss=lambda: rss, trim=(lambda: calls.append(1)) if trim == "fake" else None)
    assert heap.enabled is False
    assert heap.after_batch() is False
    assert calls == [] and heap.trims == 0


glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or glibc_malloc_trim() is None,
    reason="malloc_trim is glibc's, /proc/self/statm Linux's",
)


@glibc
def test_real_glibc_gives_freed_heap_pages_back():
    # 96 MiB in 64 KiB blocks (under any mmap threshold: they come from the heap), written to, then
    # freed except one block above them, which keeps free() from shrinking the heap by itself: the
    # pages stay resident, as a forward's activations do, until the trimmer returns them. The heap is
    # trimmed first: free pages earlier tests left resident would otherwise take the blocks without
    # the resident set growing, and there would be nothing over the slack to return.
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    glibc_malloc_trim()()
    heap = HeapTrimmer(32 * MIB)
    assert heap.enabled
    start = resident_bytes()
    blocks = [libc.malloc(64 * 1024) for _ in range(1536)]
    assert all(blocks)
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    keeper = libc.malloc(64 * 1024)
    grown = resident_bytes()
    assert grown > start + 80 * MIB  # the blocks are resident pages of their own
    for block in blocks:
        libc.free(block)
    try:
        assert resident_bytes() > grown - 16 * MIB  # free() alone gave (almost) nothing back
        assert heap.after_batch() is True
        assert heap.released_bytes > 64 * MIB
        assert resident_bytes() < grown - 64 * MIB
    finally:
        libc.free(keeper)


def test_the_batch_worker_trims_after_each_round_on_its_own_thread():
    process = FakeProcess(500 * MIB)
    heap = HeapTrimmer(32 * MIB, rss=process.read, trim=process.trim)
    engine = FakeEngine()
    batcher = make(engine, heap=heap, max_batch_pairs=1)
    process.rss = 600 * MIB  # as if the next forward left 100 MiB of free heap resident

    async def main():
        return await batcher.submit(["x" * 3], ["h"], [A])

    assert asyncio.run(main()) == [[3.0, 1.0]]
    batcher.stop()
    assert process.trim_threads == ["loraswap-batcher"]
    assert heap.trims == 1
