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

import ipaddress
from collections import OrderedDict, defaultdict, deque


def source_key(host: str) -> str:
    """Who a connection is counted against: the IPv4 address, or the /64 of
    an IPv6 address (one host usually owns a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class HandshakeGuard:
    def __init__(self, clock, max_pending: int = 1024, max_pending_per_source: int = 256,
                 failures: int = 5, window: float = 60.0, penalty: float = 60.0,
                 max_tracked_sources: int = 100_000):
        self.clock = clock
        self.max_pending, self.max_pending_per_source = max_pending, max_pending_per_source
        self.failures, self.window, self.penalty = failures, window, penalty
        self.max_tracked_sources = max_tracked_sources
        self.pending = 0
        self.pending_by_source: dict[str, int] = defaultdict(int)
        self._failures: OrderedDict[str, deque] = OrderedDict()  # least recently failed first
        self._banned_until: OrderedDict[str, float] = OrderedDict()
        self.refused = 0

    def admit(self, host: str) -> str | None:
        """``None`` to go ahead, else why the connection must be closed now."""
        source = source_key(host)
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

    def done(self, host: str, succeeded: bool | None) -> None:
        """An admitted handshake ended (success, failure, timeout, hang-up);
        ``None``: ended without saying anything about the peer (neither
        clears nor adds to its failures)."""
        source = source_key(host)
        if source not in self.pending_by_source:
            return  # not admitted (or already reported): nothing to release
        self.pending -= 1
        left = self.pending_by_source[source] - 1
        if left:
            self.pending_by_source[source] = left
        else:
            del self.pending_by_source[source]
        if succeeded is None:
            return
        if succeeded:
            self._failures.pop(source, None)
            return
        now = self.clock.seconds()
        recent = self._failures.pop(source, None)
        if recent is None:
            recent = deque()
            while len(self._failures) >= self.max_tracked_sources:
                self._failures.popitem(last=False)  # forget the quietest source, O(1)
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.failures:
            self._banned_until.pop(source, None)
            self._banned_until[source] = now + self.penalty
            while len(self._banned_until) > self.max_tracked_sources:
                self._banned_until.popitem(last=False)
        else:
            self._failures[source] = recent  # most recent last
