# -*- test-case-name: tests.test_poolstate -*-
"""The life of a pool connection, as small sans-IO state machines.

A pool connection goes through a few states on each side, and what may
happen to it depends only on the state: bytes from the server before
POOL_AUTH is sent are a violation, only an idle connection may be claimed,
a connection is counted as "being dialled" until it is idle or gone.  The
protocols (:class:`tunnelpass.tunnel.clientpool.PoolConnection`,
:class:`tunnelpass.tunnel.gate.TunnelConnection`) feed events in; the machine
says whether the event is allowed and tells one observer of every change,
so a counter such as the client's ``dialing`` is kept in exactly one
place instead of being adjusted wherever a connection happens to end.

Client (:class:`ClientPoolLife`)::

    dialling --auth_sent--> authenticating --pool_ok--> idle --claimed--> claimed
        \\_____________________\\________________________\\______________\\--lost--> closed

Server (:class:`ServerPoolLife`)::

    header --hello--> control
    header --filed--> idle --claimed--> claimed
    (any) --lost--> closed

``lost`` is allowed in every state (a connection can die at any time) and
is idempotent; any other event in the wrong state raises
:class:`InvalidTransition` -- a bug in the caller, never the peer's doing
(the protocols check the state before acting on what the peer sent).
"""

from __future__ import annotations

from tunnelpass.carriers.stream import stream_of

#: States (shared names, so a log line or a test reads the same on both sides).
DIALLING = "dialling"
AUTHENTICATING = "authenticating"
HEADER = "header"
CONTROL = "control"
IDLE = "idle"
CLAIMED = "claimed"
CLOSED = "closed"

LOST = "lost"


class InvalidTransition(Exception):
    """An event that the current state does not allow."""


class Life:
    """A table-driven machine: ``TRANSITIONS[(state, event)] -> state``.

    *observer(old, new)* hears every change; at construction it hears
    ``(None, initial)``, so an observer that counts states sees each machine
    enter and leave exactly once."""

    TRANSITIONS: dict = {}
    INITIAL = ""

    __slots__ = ("state", "_observer")

    def __init__(self, observer=None):
        self.state = self.INITIAL
        self._observer = observer
        if observer is not None:
            observer(None, self.state)

    def fire(self, event: str) -> str:
        """Apply *event*; the new state."""
        old = self.state
        if event == LOST:
            if old == CLOSED:
                return old
            new = CLOSED
        else:
            new = self.TRANSITIONS.get((old, event))
            if new is None:
                raise InvalidTransition(f"{event} in state {old}")
        self.state = new
        if self._observer is not None:
            self._observer(old, new)
        if new == CLOSED:
            self._observer = None  # nothing follows; and no cycle through a bound method
        return new

    def can(self, event: str) -> bool:
        return event == LOST or (self.state, event) in self.TRANSITIONS

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state}>"


class ClientPoolLife(Life):
    """A client pool connection: dialled (TCP, then TLS if any), POOL_AUTH
    sent, filed by the server (POOL_OK), claimed (OPEN read in the receive
    flow, a local user in the send flow), closed."""

    INITIAL = DIALLING
    TRANSITIONS = {
        (DIALLING, "auth_sent"): AUTHENTICATING,
        (AUTHENTICATING, "pool_ok"): IDLE,
        (IDLE, "claimed"): CLAIMED,
    }
    #: States counted as "being dialled" (the ``pool_dialing`` gauge, and
    #: what the refill counts besides the idle ones).
    PENDING = frozenset({DIALLING, AUTHENTICATING})


class ServerPoolLife(Life):
    """A connection on the tunnel port after TLS: its first frame makes it a
    control channel (HELLO) or an idle pool connection (POOL_AUTH, filed),
    which a user claims (receive flow) or the client opens (send flow)."""

    INITIAL = HEADER
    TRANSITIONS = {
        (HEADER, "hello"): CONTROL,
        (HEADER, "filed"): IDLE,
        (IDLE, "claimed"): CLAIMED,
    }


class PendingCount:
    """An observer for many :class:`ClientPoolLife` machines: how many are
    in a pending state (dialling or authenticating) right now."""

    __slots__ = ("count",)

    def __init__(self):
        self.count = 0

    def __call__(self, old, new) -> None:
        pending = ClientPoolLife.PENDING
        self.count += (new in pending) - (old in pending)


class IdleMember:
    """What the idle pool asks of a pool connection on either side (mixed
    into the connection's protocol, which has ``life`` and ``transport``)."""

    def claim(self):
        """This connection's stream, taken out of the idle state; None if it
        is not idle and open (closed while idle, or already claimed)."""
        if self.life.state != IDLE or not self.transport.connected:
            return None
        self.life.fire("claimed")
        return stream_of(self.transport)

    def close(self) -> None:
        """Close an idle connection (a surplus, retired, or its session ended)."""
        self.transport.loseConnection()
