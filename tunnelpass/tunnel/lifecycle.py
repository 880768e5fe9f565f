# -*- test-case-name: tests.test_lifecycle -*-
"""The lifecycles of a tunnel end, as small sans-IO state machines.

* :class:`SessionLife`: the client's session with the server --
  connecting -> handshaking -> up -> replaced or lost -> backing off ->
  connecting again (``ClientService`` does the waiting; the machine says
  where the session is).
* :class:`GateLife`: one unauthenticated connection at the server's tunnel
  port -- accepted -> admitted (or not) -> handshaking -> passed, refused,
  timed out, evicted or closed.  Leaving an *open* state is what releases
  the handshake guard's slot, exactly once.

Each is a table of ``(state, event) -> state``; an event the table does not
allow raises :class:`InvalidTransition` (a bug, not a peer's doing: peers
only cause events).  The clock is injected; :attr:`Machine.since` is when
the current state began.  Thin protocols feed events and act on states.
"""

from __future__ import annotations

from tunnelpass.carriers.poolstate import InvalidTransition  # one error for every machine


class Machine:
    """A state, the table of allowed changes and when the state began."""

    initial = ""
    transitions: dict[tuple[str, str], str] = {}

    def __init__(self, clock):
        self.clock = clock
        self.state = self.initial
        self.since = self._now()

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0  # no clock: a service built, not run

    def can(self, event: str) -> bool:
        return (self.state, event) in self.transitions

    def fire(self, event: str) -> str:
        """Apply *event*; the new state, or InvalidTransition."""
        new = self.transitions.get((self.state, event))
        if new is None:
            raise InvalidTransition(f"{type(self).__name__}: {event!r} in state {self.state!r}")
        if new != self.state:
            self.state, self.since = new, self._now()
        return new


def _table(rows) -> dict:
    return {(state, event): new for states, event, new in rows for state in states.split()}


class SessionLife(Machine):
    """The client's session with the server."""

    initial = "idle"
    transitions = _table([
        ("idle backing_off", "connect", "connecting"),
        ("connecting", "connected", "handshaking"),
        ("connecting handshaking", "fail", "lost"),
        ("handshaking", "establish", "up"),
        ("up", "replaced", "replaced"),
        ("up", "lose", "lost"),
        ("lost replaced", "back_off", "backing_off"),
        ("idle connecting handshaking up replaced lost backing_off stopped", "stop", "stopped"),
    ])

    @property
    def up(self) -> bool:
        return self.state == "up"


class GateLife(Machine):
    """One unauthenticated connection at the tunnel port."""

    initial = "accepted"
    #: States that hold a handshake slot (and a deadline).
    OPEN = frozenset({"admitted", "handshaking", "turned_away"})
    transitions = _table([
        ("accepted", "admit", "admitted"),
        ("accepted", "deny", "not_admitted"),
        ("admitted", "header", "handshaking"),
        ("admitted handshaking", "pass", "passed"),
        ("admitted handshaking", "refuse", "refused"),
        ("handshaking", "turn_away", "turned_away"),
        ("admitted handshaking turned_away", "expire", "timed_out"),
        ("admitted handshaking", "evict", "evicted"),
        ("admitted handshaking turned_away", "lose", "closed"),
    ])

    @property
    def open(self) -> bool:
        return self.state in self.OPEN
