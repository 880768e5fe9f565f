# -*- test-case-name: tests.test_guard -*-
"""Admission control for unauthenticated connections (groundwork for issue 3).

Every connection to the tunnel port is unauthenticated until its handshake
succeeds.  :class:`HandshakeGuard` bounds that state: a global cap and a
per-source cap on handshakes in progress, and a penalty box for sources
that keep failing (``failures`` failures within ``window`` seconds ban the
source for ``penalty`` seconds).  Sans-IO: the caller asks :meth:`admit`
when a connection arrives, and reports :meth:`done` with the outcome.
"""

from __future__ import annotations

from collections import defaultdict, deque


class HandshakeGuard:
    def __init__(self, clock, max_pending: int = 1024, max_pending_per_source: int = 32,
                 failures: int = 5, window: float = 60.0, penalty: float = 60.0,
                 max_tracked_sources: int = 100_000):
        self.clock = clock
        self.max_pending, self.max_pending_per_source = max_pending, max_pending_per_source
        self.failures, self.window, self.penalty = failures, window, penalty
        self.max_tracked_sources = max_tracked_sources
        self.pending = 0
        self.pending_by_source: dict[str, int] = defaultdict(int)
        self._failures: dict[str, deque] = {}
        self._banned_until: dict[str, float] = {}
        self.refused = 0

    def admit(self, source: str) -> str | None:
        """``None`` to go ahead, else why the connection must be closed now."""
        now = self.clock.seconds()
        until = self._banned_until.get(source)
        if until is not None:
            if now < until:
                self.refused += 1
                return "too many failed handshakes from this address"
            del self._banned_until[source]
        if self.pending >= self.max_pending:
            self.refused += 1
            return "too many handshakes in progress"
        if self.pending_by_source[source] >= self.max_pending_per_source:
            self.refused += 1
            return "too many handshakes in progress from this address"
        self.pending += 1
        self.pending_by_source[source] += 1
        return None

    def done(self, source: str, succeeded: bool) -> None:
        """An admitted handshake ended (success, failure, timeout, hang-up)."""
        self.pending -= 1
        left = self.pending_by_source[source] - 1
        if left:
            self.pending_by_source[source] = left
        else:
            del self.pending_by_source[source]
        if succeeded:
            self._failures.pop(source, None)
            return
        now = self.clock.seconds()
        recent = self._failures.get(source)
        if recent is None:
            if len(self._failures) >= self.max_tracked_sources:
                self._forget_oldest(now)
            recent = self._failures[source] = deque()
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.failures:
            self._banned_until[source] = now + self.penalty
            del self._failures[source]

    def _forget_oldest(self, now: float) -> None:
        """Keep the failure table bounded (a spray from many addresses)."""
        stale = [s for s, times in self._failures.items() if not times or now - times[-1] > self.window]
        for source in stale or list(self._failures)[: max(1, len(self._failures) // 10)]:
            del self._failures[source]
        for source in [s for s, until in self._banned_until.items() if until <= now]:
            del self._banned_until[source]
