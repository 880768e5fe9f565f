# -*- test-case-name: tests.test_guard -*-
"""Admission control for unauthenticated connections on the tunnel port.

Every connection is unauthenticated until its handshake succeeds.
:class:`HandshakeGuard` bounds that state and rations key guesses.  It is
sans-IO: the clock is injected, and the caller reports what happens.

**Pending handshakes** (:meth:`HandshakeGuard.admit`, :meth:`~HandshakeGuard.release`):
at most ``max_pending`` in all and ``max_pending_per_source`` per source
(an IPv4 address, or the /64 of an IPv6 address).  When the global cap is
reached the newcomer does not simply lose: the guard evicts the *oldest*
pending connection of the source holding the *most* pending slots, as long
as that is fairer than refusing the newcomer -- the newcomer's source holds
nothing yet, or at least two fewer slots than the top source.  So a flood
of silent sockets from a few addresses cannot starve a client that holds
one or two: the flooders evict one another's oldest sockets, never the
client's, and their shares level out without the churn of endless
evictions between equal flooders.  Finding the victim is O(1): sources are
kept in buckets by how many slots they hold.

**Key guesses** (:meth:`~HandshakeGuard.may_try_key`,
:meth:`~HandshakeGuard.key_failed`): a key is evaluated only while the
source has fewer than ``failures`` wrong keys within ``window`` and is not
banned, and a wrong key is recorded at the moment it is evaluated -- not
when its connection ends, which a guesser controls (it may never finish a
TLS close, or be evicted).  Evaluation is synchronous, so parallel
connections cannot overshoot; successes are not counted at all, so they
forgive nothing: at most ``failures`` wrong keys are evaluated per source
per ``window``, whatever else the source does.  The ``failures``-th wrong
key bans the source's control connections for ``penalty`` seconds.  No
state is held for attempts that have not been evaluated, so connections
that stall before sending a key cannot keep anyone else's out.
The ban concerns key attempts only: connections are still admitted (a pool
connection proves an existing session with a MAC under its 256-bit session
key, which a neighbour's wrong keys say nothing about).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

#: Why :meth:`HandshakeGuard.admit` or :meth:`HandshakeGuard.may_try_key`
#: refused: a fixed set, for the ``handshake_refused{reason}`` metric.
REFUSAL_REASONS = ("global_cap", "source_cap", "banned", "key_attempts")


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


class Refused(Exception):
    """The guard says no: *reason* is one of :data:`REFUSAL_REASONS`, *text*
    what a log line (or the peer, for key attempts) is told."""

    def __init__(self, reason: str, text: str):
        super().__init__(text)
        self.reason, self.text = reason, text


@dataclass(frozen=True)
class Ban:
    """A source has just been banned from control connections.  *log* is
    true at most once per source per window: what an operator must see,
    without a flood of lines from a source that keeps trying."""

    source: str
    reason: str
    duration: float
    log: bool


class Ticket:
    """One admitted connection's pending slot."""

    __slots__ = ("source", "evict", "released")

    def __init__(self, source: str, evict: Callable[[], None]):
        self.source, self.evict = source, evict
        self.released = False


class HandshakeGuard:
    """Caps, fair eviction and key-guess accounting (see the module docstring)."""

    def __init__(self, clock, max_pending: int = 1024, max_pending_per_source: int = 256,
                 failures: int = 5, window: float = 60.0, penalty: float = 60.0,
                 max_tracked_sources: int = 100_000):
        self.clock = clock
        self.max_pending, self.max_pending_per_source = max_pending, max_pending_per_source
        self.failures, self.window, self.penalty = failures, window, penalty
        self.max_tracked_sources = max_tracked_sources
        self._tickets: dict[str, dict[Ticket, None]] = {}  # per source, oldest first
        self._levels: dict[int, dict[str, None]] = {}  # slots held -> sources (earliest at that level first)
        self._top = 0  # the most slots any one source holds
        self._pending = 0
        self._failures: OrderedDict[str, deque] = OrderedDict()  # least recently failed first
        self._banned_until: OrderedDict[str, float] = OrderedDict()
        self._ban_logged: OrderedDict[str, float] = OrderedDict()
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.evictions = 0
        self.bans = 0

    # Pending handshakes

    @property
    def pending(self) -> int:
        """Connections admitted whose handshake has not ended."""
        return self._pending

    @property
    def top_source_pending(self) -> int:
        """The most pending slots one source holds."""
        return self._top

    def held(self, host: str) -> int:
        """Pending slots held by *host*'s source."""
        return len(self._tickets.get(source_key(host), ()))

    def admit(self, host: str, evict: Callable[[], None]) -> Ticket:
        """Admit a connection from *host*, or raise :class:`Refused`.

        *evict* is called (at most once, synchronously, from a later
        :meth:`admit`) if this connection loses its slot to a fairer
        claimant: it must close the connection.  Its slot is already free
        then; :meth:`release` on its ticket does nothing more."""
        source = source_key(host)
        held = len(self._tickets.get(source, ()))
        if held >= self.max_pending_per_source:
            self._refuse("source_cap", "too many handshakes in progress from this address")
        if self._pending >= self.max_pending:
            if not self._pending or (held and held + 1 >= self._top):
                self._refuse("global_cap", "too many handshakes in progress")
            self._evict_one()
        ticket = Ticket(source, evict)
        self._add(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The ticket's handshake ended (success, failure, timeout, hang-up)."""
        if not ticket.released:
            self._remove(ticket)

    def _evict_one(self) -> None:
        victim_source = next(iter(self._levels[self._top]))
        victim = next(iter(self._tickets[victim_source]))
        self._remove(victim)
        self.evictions += 1
        victim.evict()

    def _refuse(self, reason: str, text: str):
        self.refused[reason] += 1
        raise Refused(reason, text)

    def _add(self, ticket: Ticket) -> None:
        tickets = self._tickets.setdefault(ticket.source, {})
        self._move(ticket.source, len(tickets), len(tickets) + 1)
        tickets[ticket] = None
        self._pending += 1

    def _remove(self, ticket: Ticket) -> None:
        ticket.released = True
        tickets = self._tickets[ticket.source]
        del tickets[ticket]
        self._move(ticket.source, len(tickets) + 1, len(tickets))
        if not tickets:
            del self._tickets[ticket.source]
        self._pending -= 1

    def _move(self, source: str, old: int, new: int) -> None:
        """*source* now holds *new* slots instead of *old* (they differ by one)."""
        if old:
            level = self._levels[old]
            del level[source]
            if not level:
                del self._levels[old]
                if self._top == old and new < old:
                    self._top = new  # it was alone at the top: now one lower (or nothing pending)
        if new:
            self._levels.setdefault(new, {})[source] = None
            self._top = max(self._top, new)

    # Key guesses

    def may_try_key(self, host: str) -> None:
        """A control connection from *host* is about to have its key
        evaluated (or asks to, with HELLO).  Raise :class:`Refused`
        ("banned" or "key_attempts") if its source may not try one now."""
        source, now = source_key(host), self.clock.seconds()
        until = self._banned_until.get(source)
        if until is not None:
            if now < until:
                self._refuse("banned", f"too many wrong keys from this address; try again in {until - now:.0f} s")
            del self._banned_until[source]
        recent = self._failures.get(source)
        if recent is not None:
            self._expire(recent, now)
            if len(recent) >= self.failures:
                self._refuse("key_attempts", f"too many key attempts from this address within {self.window:g} s")

    def key_failed(self, host: str) -> Ban | None:
        """A key from *host* was evaluated and was wrong: recorded now (never
        forgotten because of a success); returns the ban it caused, if any."""
        return self._record_failure(source_key(host))

    def _expire(self, recent: deque, now: float) -> None:
        while recent and now - recent[0] >= self.window:
            recent.popleft()

    def _record_failure(self, source: str) -> Ban | None:
        now = self.clock.seconds()
        recent = self._failures.pop(source, None)
        if recent is None:
            recent = deque()
            _bound(self._failures, self.max_tracked_sources - 1)  # forget the quietest source, O(1)
        recent.append(now)
        self._expire(recent, now)
        self._failures[source] = recent  # most recent last
        if len(recent) < self.failures:
            return None
        self._banned_until.pop(source, None)
        self._banned_until[source] = now + self.penalty
        _bound(self._banned_until, self.max_tracked_sources)
        self.bans += 1
        logged = self._ban_logged.pop(source, None)
        log = logged is None or now - logged >= self.window
        self._ban_logged[source] = now if log else logged
        _bound(self._ban_logged, self.max_tracked_sources)
        return Ban(source, f"{len(recent)} wrong keys within {self.window:g} s", self.penalty, log)

    def banned(self, host: str) -> bool:
        """Whether *host*'s source may not start control connections now."""
        until = self._banned_until.get(source_key(host))
        return until is not None and self.clock.seconds() < until


def _bound(table: OrderedDict, size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)
