# -*- test-case-name: tests.test_tlslevel -*-
"""Which TLS level a client uses for its next attempt to reach the server.

A client told the level (``--tls``, ``--pin``, ``--ca``/``--sni``, or a
token that carries it) uses that level and nothing else: whatever a peer
says, it never changes.

A client that was not told learns it, and learning must not let an
unauthenticated peer lock it out.  Anyone on the path can answer a plain
HELLO with "TLS required (level 2)", or terminate TLS with any certificate
and say so inside; if the client adopted that for good, it could never
reach the real server again.  So:

* a level named by an unauthenticated frame (:meth:`hint`) is used for the
  next attempt only;
* every attempt that reaches the server but fails before a session starts
  (:meth:`failed`) moves on to the next level in turn, so a reconnect loop
  tries every level within three attempts, whatever the peer says;
* only an authenticated session (:meth:`succeeded`, whose level is covered
  by the session MAC) settles the level, and the next reconnect starts
  there.

Attempts that never reach the server (refused, timed out, no route) say
nothing about TLS and leave the level alone.  Sans-IO: no clock, no I/O.
"""

from __future__ import annotations

LEVELS = (0, 1, 2)


class TLSLevel:
    def __init__(self, known: int | None = None):
        if known is not None and known not in LEVELS:
            raise ValueError(f"TLS level must be one of {LEVELS}")
        self.known = known
        self._turn = known if known is not None else 0  # where the rotation stands
        self._hint: int | None = None  # a one-shot level for the next attempt
        self.current = self._turn  # the level of the attempt under way / next

    @property
    def learning(self) -> bool:
        """Whether this client may change its level at all."""
        return self.known is None

    def hint(self, level: int) -> bool:
        """An unauthenticated peer said the server requires *level* (call
        after :meth:`failed` for the attempt that got the answer).  Returns
        whether the next attempt uses it (then it may start at once)."""
        if not self.learning or level not in LEVELS:
            return False
        if level != self._turn:
            self._hint = level
        self.current = level
        return True

    def failed(self) -> None:
        """The attempt at :attr:`current` reached the server and failed
        before a session started (TLS error, refusal, a level mismatch)."""
        if not self.learning:
            return
        if self._hint is not None and self.current == self._hint:
            self._hint = None  # the hint was wrong (or forged): back to the turn
        else:
            self._turn = LEVELS[(LEVELS.index(self._turn) + 1) % len(LEVELS)]
        self.current = self._turn

    def succeeded(self, level: int) -> None:
        """A session started at *level* (the server's MAC'd config says so)."""
        if not self.learning:
            return
        self._hint = None
        self._turn = self.current = level
