# -*- test-case-name: tests.test_sessiontable -*-
"""The UDP session table every UDP listener shares (the forwarder's, the
tunnel's ingress and egress): sessions by key, least recently active first,
and what to do when it is full.

A full table makes room instead of refusing: a DNS client that uses a
fresh source port per query (as resolvers and most stub libraries do)
starts a session per query, and refusing those until old ones expire
(``--udp-idle``, 60 s) would serve only ``--max-sessions / --udp-idle``
new clients a second.  So a new session evicts, in this order:

1. the least recently active session that has seen a reply and then been
   quiet for ``ACTIVE_WINDOW`` (its exchange is most likely over: a DNS
   query was answered);
2. else the least recently active session that has seen no reply yet and
   been quiet for ``REPLY_WAIT`` (longer: it may be waiting for one);
3. else nobody: every session is active, and the new one is refused.

Refusing rather than evicting a session that waits for its reply sheds
load when replies are slow: evicting it would lose that reply *and* spend
a new session's resources, and every new session would then evict one
about to be answered.  A refusal lasts only until answered sessions have
been quiet for ``ACTIVE_WINDOW``, so new sessions get in again at the rate
old exchanges finish.

Two ordered dicts (answered, not yet answered), each least recently active
first, make every step O(1): traffic moves a session to the end of its
dict (:meth:`SessionTable.touch`), a first reply moves it to the other.

Sans-IO: sessions are any objects with ``key`` (hashable: a user address,
or the session itself), ``last_activity`` (seconds), ``answered`` (bool)
and ``close()`` (which calls :meth:`remove` on this table, directly or
through its listener); the clock is injected.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.logger import Logger

from tunnelpass.ops.logs import Throttle

#: A session that has had its reply and then a datagram (either way)
#: within this many seconds is active and never evicted.  Short, so that
#: churn is absorbed: a table of N sessions makes room for N / (ACTIVE_WINDOW
#: + reply time) new sessions a second (the default 1,000: up to 4,000)
#: before it refuses any.  Long against any flow that keeps sending (VoIP
#: and games send every 10-50 ms).
ACTIVE_WINDOW = 0.25
#: A session that has not had a reply yet is active for this long after its
#: last datagram: it may be waiting for one (a DNS answer on a LAN or through
#: a tunnel takes milliseconds, a recursive lookup up to about a second).
REPLY_WAIT = 1.0
#: Why a full table refused a new session, for the listeners' warnings.
ALL_ACTIVE = (f"every session active (a datagram within {ACTIVE_WINDOW}s, or {REPLY_WAIT}s while "
              "awaiting its first reply)")
#: One eviction log line per this many seconds at most (with a count).
EVICTION_LOG_INTERVAL = 10.0

log = Logger(namespace="tunnelpass.udp")


class SessionTable:
    """Sessions by ``session.key``, least recently active first.  The caller decides when the table is full (:meth:`make_room`
    takes that test) and counts sessions in its stats; the table counts
    evictions (``stats.udp_evictions``) and logs them, throttled: at info
    while every evicted session had had its reply (a full table under DNS
    churn is normal), as a warning once sessions still waiting for a reply
    are evicted (replies may be lost: --max-sessions is too small for the
    traffic, or a flood of new sources is pushing real users out)."""

    def __init__(self, name: str, clock, stats, window: float = ACTIVE_WINDOW, reply_wait: float = REPLY_WAIT):
        self.name, self.clock, self.stats = name, clock, stats
        self.window, self.reply_wait = window, reply_wait
        self._waiting: OrderedDict = OrderedDict()  # no reply yet
        self._answered: OrderedDict = OrderedDict()
        self._log = Throttle(clock, EVICTION_LOG_INTERVAL)
        self._unanswered_evictions = 0  # since the last log line

    # A mapping, as far as the listeners need one.

    def __len__(self) -> int:
        return len(self._waiting) + len(self._answered)

    def __bool__(self) -> bool:
        return bool(self._waiting) or bool(self._answered)

    def __contains__(self, key) -> bool:
        return key in self._waiting or key in self._answered

    def get(self, key, default=None):
        session = self._waiting.get(key)
        if session is None:
            session = self._answered.get(key, default)
        return session

    def values(self) -> list:
        """Every session, least recently active first within each group."""
        return list(self._waiting.values()) + list(self._answered.values())

    def __iter__(self):
        return iter(self.values())

    def add(self, session) -> None:
        """A new session (the most recently active); its key must be new."""
        (self._answered if session.answered else self._waiting)[session.key] = session

    def remove(self, session) -> bool:
        """Forget *session* (closed); False if it is not here (already
        gone, or a newer session has its key)."""
        key = session.key
        for group in (self._waiting, self._answered):
            if group.get(key) is session:
                del group[key]
                return True
        return False

    # The hot path.

    def touch(self, session, now: float) -> None:
        """A datagram either way: *session* becomes the most recently active."""
        session.last_activity = now
        try:
            (self._answered if session.answered else self._waiting).move_to_end(session.key)
        except KeyError:
            pass  # closed, or not in this table yet

    def replied(self, session, now: float) -> None:
        """A datagram back towards the user: activity, and the first one
        marks *session* answered."""
        if not session.answered:
            session.answered = True
            key = session.key
            if self._waiting.get(key) is session:
                del self._waiting[key]
                self._answered[key] = session
        self.touch(session, now)

    # Full tables.

    def victim(self):
        """The session to evict for a new one, or None if every session is
        active (see the module's docstring)."""
        now = self.clock.seconds()
        for group, quiet in ((self._answered, self.window), (self._waiting, self.reply_wait)):
            if group:
                session = group[next(iter(group))]
                if session.last_activity <= now - quiet:
                    return session
        return None

    def make_room(self, full) -> bool:
        """Evict sessions while ``full()`` says there is no room for one
        more; False if it stays full (every session is active: the caller
        refuses the new one and counts it)."""
        while full():
            session = self.victim()
            if session is None:
                return False
            self.evict(session)
        return True

    def evict(self, session) -> None:
        """Close *session* to make room, counted and logged.  It leaves the
        table whatever its close does: a close that fails must not leave it
        there to be picked again (``make_room`` would never end)."""
        self.stats.udp_evictions += 1
        if not session.answered:
            self._unanswered_evictions += 1
        try:
            session.close()
        except Exception:
            log.failure("{listener}: closing an evicted UDP session failed", listener=self.name)
        self.remove(session)
        if self._log.ready():
            count, unanswered = self._log.take_count(), self._unanswered_evictions
            self._unanswered_evictions = 0
            if unanswered:
                log.warn("{listener}: UDP session table full: evicted {count} quiet session(s), {unanswered} "
                         "of them still without a reply after {reply_wait}s (raise --max-sessions if they were "
                         "real users)", reply_wait=self.reply_wait,
                         listener=self.name, count=count, unanswered=unanswered, event="udp_evictions")
            else:
                log.info("{listener}: UDP session table full: evicted {count} quiet, answered session(s) "
                         "to admit new ones", listener=self.name, count=count, unanswered=0,
                         event="udp_evictions")
