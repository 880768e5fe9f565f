# -*- test-case-name: tests.test_replacement -*-
"""A session replaced by another client with the same key, and two clients
fighting over one key.

The server keeps one session at a time: a newly authenticated client
replaces the current one at once (a client that reconnects after losing
its connection must not wait for the old session to time out).  That is
also what happens, silently, when two clients are started with the same
key: each one, told it was replaced, reconnects and takes the session back
from the other, every second or two, and users see half their connections
fail.  So every replacement is a warning with both addresses (throttled,
with a count), and :class:`FightDetector` recognises the fight itself.

**What counts as a fight.**  A replacement is *contested* when the old
session was still alive -- its client was heard from within the last
:data:`ALIVE_HEARTBEATS` heartbeats.  A client that reconnects after its
own connection died replaces a session that has been silent for about
three heartbeats (that is how either end notices), so it never counts.
:data:`FIGHT_REPLACEMENTS` contested replacements within
:data:`FIGHT_WINDOW` seconds are a fight.  Each fight is reported once: an
episode ends once :data:`FIGHT_WINDOW` seconds pass without a contested
replacement, and the next one is reported again.

The detector is sans-IO (times are passed in); :class:`SessionReplacements`
is the server's thin adapter (reads the control protocols, logs, counts).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.logger import Logger

from tunnelpass.ops.logs import Throttle
from tunnelpass.config.settings import format_address

#: Contested replacements within :data:`FIGHT_WINDOW` that make a fight.
FIGHT_REPLACEMENTS = 3
#: Seconds over which contested replacements are counted, and the quiet
#: time that ends a fight's episode.
FIGHT_WINDOW = 60.0
#: An old session heard from within this many heartbeats was alive.
ALIVE_HEARTBEATS = 2
#: Seconds between two "session replaced" warnings (the others are counted).
REPLACED_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Fight:
    """Clients taking one session from each other: *clients* are their
    addresses (hosts when they differ, else host:port of the last two)."""

    clients: tuple
    replacements: int


class FightDetector:
    """Recognises a fight from the replacements it is told about."""

    def __init__(self, threshold: int = FIGHT_REPLACEMENTS, window: float = FIGHT_WINDOW):
        self.threshold, self.window = threshold, window
        self._contested: deque = deque()  # (time, old (host, port), new (host, port))
        self._reported = False  # within the current episode

    def replaced(self, now: float, old: tuple, new: tuple, old_alive: bool) -> Fight | None:
        """Session of *old* (host, port) replaced by *new* at *now*; the
        fight, once per episode, when this replacement completes one."""
        events = self._contested
        if events and now - events[-1][0] >= self.window:
            self._reported = False  # quiet for a whole window: that episode is over
        while events and now - events[0][0] >= self.window:
            events.popleft()
        if not old_alive:
            return None
        events.append((now, old, new))
        if self._reported or len(events) < self.threshold:
            return None
        self._reported = True
        return Fight(_clients(events), len(events))


def _clients(events) -> tuple:
    """Who is fighting: the distinct hosts involved, oldest first; if all
    are one host, the last replaced and replacing connections."""
    hosts: dict[str, None] = {}
    for _, old, new in events:
        hosts.setdefault(old[0], None)
        hosts.setdefault(new[0], None)
    if len(hosts) > 1:
        return tuple(hosts)
    _, old, new = events[-1]
    return format_address(*old), format_address(*new)


def _peer(control) -> tuple:
    peer = control.transport.getPeer() if control.transport is not None else None
    return getattr(peer, "host", "?"), getattr(peer, "port", 0)


def join_names(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class SessionReplacements:
    """The server's account of replaced sessions: ``count`` for the health
    line and metrics, a throttled ``session_replaced`` warning, and a
    ``session_fight`` warning once per fight."""

    log = Logger(namespace="tunnelpass.server")

    def __init__(self, clock, interval: float = REPLACED_LOG_INTERVAL, detector: FightDetector | None = None):
        self.clock = clock
        self.count = 0
        self.detector = detector or FightDetector()
        self._throttle = Throttle(clock, interval)

    def replaced(self, old_control, new_control) -> Fight | None:
        """*old_control*'s session is being replaced by *new_control*'s
        (call before the old one is closed: its address is read here)."""
        self.count += 1
        now = self.clock.seconds()
        silent = max(0.0, now - old_control.last_heard)
        alive = silent < ALIVE_HEARTBEATS * old_control.heartbeat
        old, new = _peer(old_control), _peer(new_control)
        if self._throttle.ready():
            how = ("the old client was still answering: two clients may be using this key" if alive else
                   "the old session had been silent for {silent:.0f} s: probably the same client reconnecting")
            count = self._throttle.take_count()
            self.log.warn(
                "session of client {old} replaced by a new session from {new} with the same key (" + how +
                ("; {count} replacements since the last such line)" if count > 1 else ")"),
                event="session_replaced", old=format_address(*old), new=format_address(*new), old_alive=alive,
                silent=round(silent, 3), count=count,
            )
        fight = self.detector.replaced(now, old, new, alive)
        if fight is not None:
            self.log.warn(
                "two clients are using the same key and take the session from each other: {clients}; "
                "stop one of them or give each its own server/key ({replacements} replacements within "
                "{window:g} s)",
                event="session_fight", clients=join_names(fight.clients), addresses=list(fight.clients),
                replacements=fight.replacements, window=self.detector.window,
            )
        return fight
