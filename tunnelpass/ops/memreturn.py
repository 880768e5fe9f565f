# -*- test-case-name: tests.test_memreturn -*-
"""Give memory back to the system after a burst of connections has ended.

Thousands of connections leave the C heap (OpenSSL's per-connection state,
socket buffers Python copied through, the interpreter's own small-object
arenas) fragmented: glibc keeps freed pages mapped, so a process that once
held 5,000 tunnelled connections stays that large after they close.
``malloc_trim(0)`` returns every free page, top of heap and holes alike.

Connections caught in reference cycles (a protocol and its transport)
are only freed by a full garbage collection, which Python runs rarely
once many objects are long-lived; so a full collection comes first.
Both cost a walk of the heap, so they run only after a large drop: a
periodic check counts the connections that ended since the last trim and
trims once at least :data:`MIN_DROP` have and the live count is at most
half of what it can have reached meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

from twisted.application.internet import TimerService
from twisted.logger import Logger

#: Connections that must have ended since the peak before a trim is worth it.
MIN_DROP = 256
#: Seconds between checks.
INTERVAL = 10.0

log = Logger(namespace="tunnelpass.memory")


def rss_mib() -> float | None:
    """This process's resident set, MiB (None where /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _libc_trim():
    """``malloc_trim`` from the C library, or None (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryReturn:
    """Trims the heap once many connections have ended and the live count
    is at most half of what it was at its highest since the last trim.

    *live()* is the number of connections now, *opened()* the number ever
    opened: the connections that ended between two checks are known
    exactly, so a burst shorter than the check interval is not missed."""

    def __init__(self, live, opened, trim=None, min_drop: int = MIN_DROP):
        self.live, self.opened, self.min_drop = live, opened, min_drop
        self.trim = trim if trim is not None else _libc_trim()
        self._opened_at_trim = opened()
        self._live_at_trim = live()
        self.trims = 0

    def check(self) -> None:
        live, opened = self.live(), self.opened() - self._opened_at_trim
        ended = self._live_at_trim + opened - live
        highest = self._live_at_trim + opened  # the count can have reached this, never more
        if self.trim is None or ended < self.min_drop or live * 2 > highest:
            return
        before = rss_mib()
        gc.collect()  # connections caught in reference cycles hold their OpenSSL state until a full collection
        self.trim()
        self.trims += 1
        log.info("{ended} connections ended: returned free memory to the system (RSS {before} -> {after} MiB)",
                 ended=ended, before=before, after=rss_mib(), event="memory_returned")
        self._opened_at_trim += opened
        self._live_at_trim = live


def memory_return_service(live, opened, clock, interval: float = INTERVAL, trim=None) -> TimerService:
    """A child service running :meth:`MemoryReturn.check` every *interval*."""
    watcher = MemoryReturn(live, opened, trim)
    service = TimerService(interval, watcher.check)
    service.clock = clock
    service.watcher = watcher
    service.setName("memory")
    return service
