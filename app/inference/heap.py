"""Handing the C heap's free pages back to the kernel between forwards (glibc's `malloc_trim`).

On a CPU every forward allocates its activations with malloc, in sizes that change with each batch's
tokens. glibc serves blocks under its mmap threshold (raised dynamically up to 32 MiB once a large
block is freed) from its heaps, and keeps what the forward frees: free pages inside a heap are not
returned until `malloc_trim`. Measured on the embedded base (one thread, 300 forwards of 1 to 32
pairs, 16 adapters): the resident set grew from 559 MB to 881-892 MB and was still growing;
`malloc_trim(0)` at that point gave it back to 572 MB, so it was free memory, not live tensors. A server's RSS then said more about the batch sizes it had seen than
about what it holds.

`HeapTrimmer.after_batch`, called by the batch worker after each round, reads the resident set
(`/proc/self/statm`, one read) and calls `malloc_trim(0)` when it has grown more than `slack_bytes`
above where the last trim left it. With a slack of 32 MiB in the run above: RSS 572 MB after 300
forwards, never above 662 MB, trims of 3-4 ms each (ctypes releases the GIL for them). A 32-pair
forward leaves more than 32 MiB behind, so a server of full batches trims after nearly every one and
its next forward pays page faults for the pages it touches again: in an interleaved A/B (slack 32 MiB)
of servers with the 3 shipped adapters (4 rounds of 12 s, 32-pair batches) 94.3 against 96.4 pairs/s untrimmed,
with peak RSS 632 against 841 MB; at 1,000 adapters 84.7 against 85.3 pairs/s. Measuring growth from
the level after the first batch that follows a trim instead (so one batch's pages stay) was as fast
(94.4 pairs/s) and peaked at 707 MB: not kept. The default slack is 16 MiB: a server whose batches leave
less than the slack behind rests with up to that much free heap on top of its level, which the
3-adapter server (trimmed after every batch) does not; against 32 MiB, in an A/B of both servers
(3 rounds of 12 s), the 1,000-adapter server peaked 36 instead of 49 MB above the 3-adapter one, at
the same throughput (77.0 against 75.2 pairs/s; 3 adapters 87.3 against 86.7).

Elsewhere than Linux with glibc (no `malloc_trim`, or no `/proc`) the trimmer is off and says so once.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

STATM = "/proc/self/statm"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
GLIBC = object()  # HeapTrimmer's default `trim`: glibc's malloc_trim, where there is one


def resident_bytes() -> int | None:
    """This process's resident set in bytes (the second field of /proc/self/statm), None without /proc."""
    try:
        with open(STATM, "rb") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS). Looked up among the
    symbols the interpreter already has loaded (`CDLL(None)`), libc's included: no library search."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Trims the C heap when the resident set has grown `slack_bytes` past its level after the last trim.

    Called from one thread (the batch worker); the counters are read by /metrics from others (ints:
    a read sees the old or the new value). The level follows the resident set down as well as up:
    an adapter evicted from the host tier unmaps its memory, and the next growth is measured from there.
    """

    def __init__(
        self,
        slack_bytes: int,
        *,
        rss: Callable[[], int | None] = resident_bytes,
        trim: Callable[[], object] | None | object = GLIBC,
    ):
        """`rss` and `trim` stand in for /proc and glibc in tests; `trim=None`: a C library without one."""
        self.slack_bytes = slack_bytes
        self._rss = rss
        self._trim = glibc_malloc_trim() if trim is GLIBC else trim
        level = rss()
        self.enabled = slack_bytes > 0 and self._trim is not None and level is not None
        if slack_bytes > 0 and not self.enabled:
            logger.info("heap trimming off: no glibc malloc_trim or no /proc/self/statm on this system")
        self._level = level
        self.trims = 0
        self.released_bytes = 0

    def counters(self) -> tuple[int, int]:
        """(trims, resident bytes they gave back), for /metrics."""
        return self.trims, self.released_bytes

    def after_batch(self) -> bool:
        """Trim if the resident set is over the level plus the slack; whether it trimmed."""
        if not self.enabled:
            return False
        now = self._rss()
        if now is None:
            return False
        if now <= self._level + self.slack_bytes:
            self._level = min(self._level, now)
            return False
        self._trim()
        after = self._rss()
        after = now if after is None else after
        self.trims += 1
        self.released_bytes += max(0, now - after)
        self._level = after
        return True
