# -*- test-case-name: tests.test_abnormal_end -*-
"""How one leg of a relay ends: cleanly, or with a reset that cannot be
mistaken for a complete stream.

* Clean (the other leg sent FIN, or TLS close_notify): the leg is closed or
  half-closed once its write buffer is out -- the peer reads every byte,
  then EOF.
* Abnormal (the other leg was reset, hit a TLS error or a truncation, its
  process died, or the relay dropped it): the leg stops reading, what was
  already relayed to it is given a bounded time (:data:`FLUSH_LIMIT`) to
  leave -- Twisted's buffer, the TLS layer's, and the kernel's send queue
  until the peer's kernel has acknowledged it --, then it is aborted.
  Twisted closes an aborted TCP socket with ``SO_LINGER`` 0, so the peer
  gets an RST: ``ECONNRESET``, never EOF.  An RST makes the kernel drop
  whatever it still had to send, hence the wait for the send queue.

Every operation here is idempotent and never raises: a relay closes legs
from ``connectionLost``, timers and shutdown, often a leg that is already
closing or gone, and an exception there would skip the relay's own
bookkeeping (a shutdown drain then never ends).  Failures are logged.

What a leg holds unsent and whether it can half-close are asked of the
stream (:mod:`tunnelpass.carriers.stream`), never read from transport internals.
"""

from __future__ import annotations

from twisted.logger import Logger, LogLevel

from tunnelpass.carriers.stream import stream_of

log = Logger(namespace="tunnelpass.relay")

#: Seconds a reset waits for what was already relayed to the leg to leave.
FLUSH_LIMIT = 2.0
#: How often that wait looks at the buffers (the kernel queue has no event).
FLUSH_POLL = 0.02


def quietly(what: str, function, *args):
    """``function(*args)``, logging instead of raising (see the module doc)."""
    try:
        return function(*args)
    except Exception:
        log.failure("{what} failed; going on", what=what, level=LogLevel.warn)
        return None


def unsent(transport) -> int:
    """Bytes written to *transport* that its peer has not acknowledged yet:
    every buffer on the way and the kernel's send queue."""
    return stream_of(transport).unsent()


def close_after_flush(transport, unregister: bool = True) -> None:
    """Close *transport* once its buffer is written (FIN, or close_notify).

    Its producer (the other leg's transport; *unregister*: one was
    registered) is unregistered first: a consumer whose producer is paused
    would otherwise resume that (dead) producer when its buffer drains,
    instead of closing.
    """
    if unregister:
        quietly("unregisterProducer", transport.unregisterProducer)
    quietly("loseConnection", transport.loseConnection)


def half_close_after_flush(transport, unregister: bool = True) -> bool:
    """Send FIN on *transport* once its buffer is written (see above);
    ``False`` if that had to be a full close.

    A stream that cannot end one direction alone (``half_closes`` false)
    is closed after the flush instead.
    """
    if not stream_of(transport).half_closes:
        close_after_flush(transport, unregister)
        return False
    if unregister:
        quietly("unregisterProducer", transport.unregisterProducer)
    quietly("loseWriteConnection", transport.loseWriteConnection)
    return True


def abort(transport) -> None:
    """Drop *transport* now: an RST, buffered bytes discarded."""
    quietly("abortConnection", transport.abortConnection)


class FlushThenReset:
    """Stop reading *transport*, wait (at most *limit* seconds on *clock*)
    until what was written to it has been acknowledged, then abort it."""

    def __init__(self, transport, clock, limit: float = FLUSH_LIMIT, poll: float = FLUSH_POLL,
                 unregister: bool = True):
        self.transport, self.clock, self.limit, self.poll = transport, clock, limit, poll
        self.unregister = unregister
        self.done = False
        self._call = None
        self._deadline = None

    def start(self) -> None:
        transport = self.transport
        quietly("pauseProducing", transport.pauseProducing)  # nothing more is relayed from it
        if self.unregister:
            quietly("unregisterProducer", transport.unregisterProducer)
        self._deadline = self.clock.seconds() + self.limit
        self._check()

    def _check(self) -> None:
        self._call = None
        if self.done:
            return
        if not getattr(self.transport, "connected", False):
            self.done = True  # gone meanwhile: nothing left to reset
            return
        if quietly("unsent", unsent, self.transport) and self.clock.seconds() < self._deadline:
            self._call = self.clock.callLater(self.poll, self._check)
            return
        self.now()

    def now(self) -> None:
        """Stop waiting: abort at once."""
        if self.done:
            return
        self.done = True
        self.cancel()
        abort(self.transport)

    def cancel(self) -> None:
        """Forget the wait (the leg is gone, or is being aborted)."""
        self.done = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
