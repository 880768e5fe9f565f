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

This is the one module that reads Twisted transport internals to do so
(write buffers, the TLS layer's lower transport), checked against
Twisted 26.10: everything else talks to transports through their
interfaces.
"""

from __future__ import annotations

import fcntl
import struct
import termios

from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

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


def socket_unsent(sock) -> int:
    """Bytes in *sock*'s kernel send queue the peer has not acknowledged
    (``SIOCOUTQ``); 0 for a closed socket or where it cannot be told."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return struct.unpack("i", raw)[0]


def unsent(transport) -> int:
    """Bytes written to *transport* that its peer has not acknowledged yet:
    a TLS layer's buffers, Twisted's write buffer, the kernel's send queue."""
    total = 0
    while isinstance(transport, ProtocolWrapper):
        aggregator = getattr(transport, "_aggregator", None)
        total += sum(len(chunk) for chunk in getattr(aggregator, "_buffer", ()))
        total += sum(len(chunk) for chunk in getattr(transport, "_appSendBuffer", ()))
        transport = transport.transport
    if transport is None:
        return total
    buffered = getattr(transport, "dataBuffer", b"")
    total += len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
    sock = getattr(transport, "socket", None)
    if sock is not None:
        total += socket_unsent(sock)
    return total


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

    Twisted's TLS transport cannot half-close (it proxies attribute lookups
    to the TCP transport beneath, so ``loseWriteConnection`` would cut the
    TLS stream): there the FIN becomes a full close after the flush, unless
    it is a :class:`~tunnelpass.tlshalf.HalfCloseTLSProtocol`.
    """
    if isinstance(transport, TLSMemoryBIOProtocol) and not getattr(type(transport), "half_closes", False):
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
