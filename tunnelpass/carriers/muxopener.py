# -*- test-case-name: tests.test_muxopener -*-
"""The listening side's streams on the multiplexed carrier (``--type 3``).

:class:`CarrierSet` holds one end's live carrier connections
(:class:`~tunnelpass.carriers.muxconn.MuxConnection`) and the users waiting
for one; :class:`MuxOpener` is the
:class:`~tunnelpass.carriers.stream.IStreamOpener` over it.  A user's
stream goes to the usable connection carrying the fewest streams (a few
connections share the load and isolate one another's head-of-line
blocking); when none is usable -- the client is reconnecting, a dead
connection is being replaced -- the user waits, in arrival order, for up
to ``--pool-timeout``, as a pool user waits for an idle connection, and is
then refused with :class:`~tunnelpass.carriers.stream.StreamUnavailable`.
At most :data:`MAX_WAITING` users wait at once.
"""

from __future__ import annotations

from collections import deque

from h2.exceptions import H2Error
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from tunnelpass.carriers.stream import KINDS, IStreamOpener, StreamUnavailable

MAX_WAITING = 4096


class CarrierSet:
    """The carrier connections streams may be opened on, and the waiters."""

    def __init__(self, clock, timeout: float):
        self.clock = clock
        self.timeout = timeout
        self.connections: list = []
        self.retired: list = []  # retired but still carrying streams: in the metrics until they end
        self._waiters: deque = deque()  # (deferred, kind, addresses, timer)
        self.ended = 0  # carrier connections that ended
        self.ended_opened = 0  # streams the ended ones carried
        self.ended_refused = 0

    def __len__(self) -> int:
        return len(self.connections)

    def add(self, connection) -> None:
        """*connection* is up: streams may go to it; waiting users do now."""
        self.connections.append(connection)
        self._serve()

    def lost(self, connection) -> None:
        """*connection* ended (its counters go to the totals)."""
        if connection in self.connections:
            self.connections.remove(connection)
        elif connection in self.retired:
            self.retired.remove(connection)
        self.ended += 1
        self.ended_opened += connection.opened
        self.ended_refused += connection.refused

    def samples(self) -> list:
        """Metrics: per live carrier connection (labelled with its name) and in all."""
        from tunnelpass.ops.metrics import Sample

        live = [c for c in (*self.connections, *self.retired) if not c.closed]  # counters never go back
        samples = [
            Sample("carriers", "gauge", "multiplexed carrier connections up (--type 3)", len(live)),
            Sample("carriers_ended", "counter", "multiplexed carrier connections that ended", self.ended),
            Sample("streams_waiting", "gauge", "users waiting for a carrier connection", len(self._waiters)),
            Sample("streams_opened_all", "counter", "streams opened on every carrier connection, ended ones too",
                   self.ended_opened + sum(c.opened for c in live)),
            Sample("streams_refused_all", "counter", "streams refused on every carrier connection, ended ones too",
                   self.ended_refused + sum(c.refused for c in live)),
        ]
        for c in live:
            labels = {"carrier": c.name.rsplit(" ", 1)[-1]}
            samples += [
                Sample("streams_active", "gauge", "streams open on a carrier connection", len(c.streams), labels),
                Sample("streams_opened", "counter", "streams opened on a carrier connection", c.opened, labels),
                Sample("streams_refused", "counter", "streams refused on a carrier connection", c.refused, labels),
                Sample("carrier_rtt_seconds", "gauge", "heartbeat round trip of a carrier connection",
                       c.rtt if c.rtt is not None else float("nan"), labels),
            ]
        return samples

    def retire_all(self) -> None:
        """No new streams on any current connection (the session ended):
        each closes once its last stream ends."""
        connections, self.connections = self.connections, []
        self.retired += connections
        for connection in connections:
            connection.retire()

    def count_for(self, session) -> int:
        """Live connections of *session* (each carries a ``session`` attribute)."""
        return sum(1 for c in self.connections if getattr(c, "session", None) is session)

    def pick(self):
        """The usable connection carrying the fewest streams, or None."""
        best = None
        for connection in self.connections:
            if connection.usable and (best is None or len(connection.streams) < len(best.streams)):
                best = connection
        return best

    def open(self, kind: str, addresses) -> Deferred:
        connection = self.pick()
        if connection is not None:
            stream = self._open_on(connection, kind, addresses)
            return succeed(stream) if stream is not None else self.open(kind, addresses)
        if len(self._waiters) >= MAX_WAITING:
            return fail(StreamUnavailable(f"{MAX_WAITING} users already wait for a carrier connection"))
        entry = []
        d = Deferred(lambda _: self._forget(entry))
        timer = self.clock.callLater(self.timeout, self._expire, entry)
        entry.extend((d, kind, addresses, timer))
        self._waiters.append(entry)
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _serve(self) -> None:
        while self._waiters:
            connection = self.pick()
            if connection is None:
                return
            _, kind, addresses, _ = self._waiters[0]
            stream = self._open_on(connection, kind, addresses)
            if stream is None:
                continue  # that connection is retired now: the next one, if any
            d, _, _, timer = self._waiters.popleft()
            timer.cancel()
            d.callback(stream)

    @staticmethod
    def _open_on(connection, kind: str, addresses):
        """A stream on *connection*, or None after retiring it (h2 refused:
        its stream ids ran out, or it is ending)."""
        try:
            return connection.open_stream(kind, addresses)
        except H2Error:
            connection.retire()
            return None

    def _expire(self, entry) -> None:
        if entry in self._waiters:
            self._waiters.remove(entry)
            entry[0].errback(StreamUnavailable(
                f"no carrier connection to the far side within {self.timeout:g} s (--pool-timeout)"))

    def _forget(self, entry) -> None:
        """The user hung up while waiting."""
        if entry in self._waiters:
            self._waiters.remove(entry)
            if entry[3].active():
                entry[3].cancel()

    def fail_waiters(self, why: str) -> None:
        """Refuse everyone waiting (the end stops)."""
        waiters, self._waiters = self._waiters, deque()
        for d, _, _, timer in waiters:
            if timer.active():
                timer.cancel()
            d.errback(StreamUnavailable(why))


@implementer(IStreamOpener)
class MuxOpener:
    """:class:`~tunnelpass.carriers.stream.IStreamOpener` over a
    :class:`CarrierSet`; *carriers_source()* is the set to use now (None:
    no session, refused with *unavailable*)."""

    def __init__(self, carriers_source, unavailable: str = "not connected", on_open=None):
        self.carriers_source = carriers_source
        self.unavailable = unavailable
        self.on_open = on_open

    def open(self, kind: str, addresses=None) -> Deferred:
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}")
        carriers = self.carriers_source()
        if carriers is None:
            return fail(StreamUnavailable(self.unavailable))
        d = carriers.open(kind, addresses)
        if self.on_open is not None:
            d.addCallback(self._opened)
        return d

    def _opened(self, stream):
        self.on_open(stream)
        return stream



@implementer(IStreamOpener)
class SessionOpener:
    """The opener of whichever carrier the current session uses:
    *choose()* returns it (the server may change ``--type`` between
    sessions)."""

    def __init__(self, choose):
        self.choose = choose

    def open(self, kind: str, addresses=None) -> Deferred:
        return self.choose().open(kind, addresses)
