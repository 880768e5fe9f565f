# -*- test-case-name: tests.test_reachlog -*-
"""Why the client cannot reach its server, how often it tries, and when it
is back.

* :func:`retry_delay`: the reconnect policy.  Capped exponential backoff
  with jitter in the upper half of the step: the delay never exceeds
  :data:`RETRY_CAP` seconds, so a client is back within about that long of
  the server's return after an outage of any length, and never falls under
  half the step, so the attempt rate stays bounded (at most one attempt
  per ``RETRY_CAP / 2`` seconds once the cap is reached) and a fleet of
  clients spreads out instead of arriving in step.
* :class:`Reachability`: logs the reason an attempt failed at warn level,
  once per change of reason (not every attempt), with the attempt count
  and the next retry's delay; then one info line when a session starts
  again, with the outage's length and the attempt count.
* :func:`connect_failure`: a failed TCP connect (refused, timed out, name
  not resolved, unreachable) in words; :func:`handshake_failure` does the
  same for an attempt that connected but never got a session.
* :class:`ReconnectingService`: ``ClientService`` whose per-attempt
  "Scheduling retry" line (which renders the endpoint object) goes to
  debug: :class:`Reachability` says what an operator needs.
"""

from __future__ import annotations

import errno
import random
import re
from dataclasses import dataclass

from twisted.application.internet import ClientService
from twisted.logger import Logger

from tunnelpass.wire.handshake import AUTH_FAILED, BAD_VERSION, TLS_REQUIRED, TRY_LATER
from tunnelpass.relay.targetlog import why_unreachable
from tunnelpass.carriers.stream import stream_of
from tunnelpass.tunnel.tlsreason import Expected, describe_tls_failure

RETRY_INITIAL = 0.5
RETRY_CAP = 3.0
#: After the server refused the key or turned the client away (a ban):
#: retrying every few seconds cannot help and keeps the ban alive.
SLOW_RETRY_CAP = 30.0
#: After another client with the same key took the session over: a pause,
#: so that two clients fighting over one key do not swap it every second.
REPLACED_PAUSE = 5.0
_LEVEL_BY_CODE = {code: level for level, code in TLS_REQUIRED.items()}


def retry_delay(attempt: int, rng=random.random, initial: float = RETRY_INITIAL, cap: float = RETRY_CAP) -> float:
    """Seconds before reconnect attempt *attempt* (1, 2, ...): a step of
    ``initial * 2**(attempt-1)`` capped at *cap*, jittered within its upper
    half."""
    step = min(cap, initial * 2.0 ** min(max(attempt - 1, 0), 32))
    return step / 2 + rng() * step / 2


def _errno_of(value: BaseException) -> int | None:
    number = getattr(value, "osError", None)
    number = getattr(value, "errno", None) if number is None else number
    if isinstance(number, int):
        return number
    if value.args and isinstance(value.args[0], int):
        return value.args[0]
    return None


#: What a failed connect to the *server* means for an operator: the kind
#: (:func:`tunnelpass.relay.targetlog.why_unreachable`, shared with target dials)
#: with where to look.
_SERVER_HINTS = {
    "connection refused": "connection refused (nothing listens on that port, or a firewall rejects it)",
    "timed out": "connection timed out (no answer: a firewall dropping packets, or the host is down)",
    "name not resolved": "name not resolved (check the host name in --tunnel or the token)",
    "network unreachable": "network unreachable (no route to that address from this host)",
    "no route to host": "host unreachable (no route to that host)",
}


def connect_failure(value: BaseException) -> str:
    """A failed TCP connect to the server, in words."""
    hinted = _SERVER_HINTS.get(why_unreachable(value))
    if hinted is not None:
        return hinted
    number = _errno_of(value)
    if number is not None:
        return f"cannot connect: {errno.errorcode.get(number, number)} ({_message(value)})"
    return f"cannot connect: {_message(value)}"


def _message(value: BaseException) -> str:
    text = str(value).strip()
    return text or type(value).__name__


@dataclass
class Verdict:
    """What one failed attempt (connected, no session) means."""

    reason: str | None = None  # why it failed: logged at warn, once per change
    note: str | None = None  # an info line (the level learnt from the server)
    back_off: bool = False  # will not change by itself: count it towards the backoff
    retry_now: bool = False  # retry at once (a plain HELLO answered by a TLS server)
    slow: bool = False  # the key was refused (or its source banned): back off up to SLOW_RETRY_CAP


def handshake_failure(control, attempt_level: int, levels, settings) -> Verdict:
    """Why a control connection ended before its session started.  Calls
    ``levels.hint`` for a "TLS required" answer (a hint for the next
    attempt only, see :mod:`tunnelpass.tunnel.tlslevel`)."""
    code = control.close_code
    if code in _LEVEL_BY_CODE:
        level = _LEVEL_BY_CODE[code]
        if levels.hint(level):
            note = f"the server says it requires TLS level {level}; trying that next"
            if attempt_level == 0:
                return Verdict(note=note, retry_now=True)  # a TLS server's answer to a plain HELLO
            return Verdict(note=note, back_off=True)  # no real server says this inside TLS
        if level == 1 and (settings.ca or settings.sni):
            text = ("the server says it uses a self-signed certificate (tls=1) but --ca/--sni ask for a "
                    "verified one; use --pin (or nothing) instead")
        elif level == 2 and settings.pin:
            text = "the server says it has a CA-signed certificate (tls=2); --pin is for tls=1 servers"
        else:
            text = (f"the server says it requires TLS level {level}, but this client uses level {attempt_level} "
                    "(--tls, --pin, --ca or the token): check both ends")
        return Verdict(reason=text, back_off=True)
    if code == AUTH_FAILED:
        return Verdict(reason="authentication failed: the server refused our key, or a man in the middle "
                              f"presented another certificate ({control.close_reason})", back_off=True, slow=True)
    if code == TRY_LATER:  # turned away: banned after wrong keys, or the server's handshake cap is full
        return Verdict(reason=f"handshake with the server failed: {control.close_reason}", back_off=True,
                       slow=True)
    if code == BAD_VERSION:
        return Verdict(reason=f"protocol version mismatch: {control.close_reason}", back_off=True)
    if control.close_reason is not None:
        return Verdict(reason=f"handshake with the server failed: {control.close_reason}", back_off=True)
    lost = getattr(getattr(control, "lost_reason", None), "value", None)
    if attempt_level:
        chain = stream_of(control.transport).peer_certificates() if control.transport is not None else []
        expected = Expected(attempt_level, settings.pin, settings.sni or settings.server_host, settings.ca)
        try:
            why = describe_tls_failure(lost, None, expected, chain=chain)
        except Exception as e:  # explaining must never break the retry loop
            why = f"{_message(lost) if lost is not None else 'connection closed'} (not explained: {type(e).__name__})"
        return Verdict(reason="TLS handshake with the server failed: " + why, back_off=True)
    text = _message(lost) if lost is not None else "connection closed"
    return Verdict(reason=f"the server closed the connection during the handshake ({text})", back_off=True)


def _same_words(reason: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", reason)


class Reachability:
    """The client's log of its attempts to reach the server (sans-IO: the
    clock and the logger are passed in)."""

    def __init__(self, clock, log: Logger, server: str):
        self.clock, self.log, self.server = clock, log, server
        self.attempts = 0  # failed attempts since the last session (or the start)
        self.since: float | None = None  # when the outage began
        self._pending: str | None = None  # the last attempt's reason, not yet logged
        self._logged: str | None = None  # the reason last logged

    def lost(self) -> None:
        """The session with the server ended: an outage begins."""
        if self.since is None:
            self.since = self.clock.seconds()

    def failed(self, reason: str) -> None:
        """An attempt failed for *reason* (logged by :meth:`retrying`)."""
        self.lost()
        self.attempts += 1
        self._pending = reason

    def retrying(self, delay: float) -> None:
        """The next attempt starts in *delay* seconds: log the last failure
        if its reason differs from the one logged before (numbers aside: a
        ban's "try again in 59 s" is the same reason as "... 37 s")."""
        reason, self._pending = self._pending, None
        if reason is None or _same_words(reason) == self._logged:
            return
        self._logged = _same_words(reason)
        self.log.warn("cannot reach the server at {server}: {reason} (attempt {attempt}, next retry in "
                      "{retry_in:.1f}s)", server=self.server, reason=reason, attempt=self.attempts,
                      retry_in=delay, event="server_unreachable")

    def connected(self) -> None:
        """A session started: say so if attempts had failed."""
        if self.attempts:
            self.log.info("reached the server at {server} again after {outage:.1f}s and {attempts} failed "
                          "attempt(s)", server=self.server, outage=self.clock.seconds() - self.since,
                          attempts=self.attempts, event="server_reachable")
        self.attempts, self.since, self._pending, self._logged = 0, None, None, None


class _DebugLogger(Logger):
    """A Logger whose info events are debug events."""

    def info(self, format=None, **kwargs):
        self.debug(format, **kwargs)


class ReconnectingService(ClientService):
    _log = _DebugLogger(namespace="tunnelpass.tunnel.client.reconnect")
