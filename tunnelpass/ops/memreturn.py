# -*- test-case-name: tests.test_memreturn -*-
"""Give memory back to the system after a burst of connections has ended.

Thousands of connections leave the C heap (OpenSSL's per-connection state,
socket buffers Python copied through, the interpreter's own small-object
arenas) fragmented: glibc keeps freed pages mapped, so a process that once
held 5,000 tunnelled connections stays that large after they close.
``malloc_trim(0)`` returns every free page, top of heap and holes alike.

It costs a walk of the heap, so it runs only after a large drop: a periodic
check compares the live connection count with its peak since the last
trim, and trims once the count has fallen by at least :data:`MIN_DROP`
and to at most half of that peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from twisted.application.internet import TimerService

#: Connections that must have ended since the peak before a trim is worth it.
MIN_DROP = 256
#: Seconds between checks.
INTERVAL = 10.0


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
    """Trims the heap after the count *live()* fell far from its peak."""

    def __init__(self, live, trim=None, min_drop: int = MIN_DROP):
        self.live, self.min_drop = live, min_drop
        self.trim = trim if trim is not None else _libc_trim()
        self.peak = 0
        self.trims = 0

    def check(self) -> None:
        live = self.live()
        if live > self.peak:
            self.peak = live
            return
        if self.trim is not None and self.peak - live >= self.min_drop and live * 2 <= self.peak:
            self.trim()
            self.trims += 1
            self.peak = live


def memory_return_service(live, clock, interval: float = INTERVAL, trim=None) -> TimerService:
    """A child service running :meth:`MemoryReturn.check` every *interval*."""
    watcher = MemoryReturn(live, trim)
    service = TimerService(interval, watcher.check)
    service.clock = clock
    service.watcher = watcher
    service.setName("memory")
    return service
