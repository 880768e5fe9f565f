# -*- test-case-name: tests.test_abnormal_end -*-
"""One leg of a relay (:mod:`tunnelpass.relay.relay`): half-close, --rate pauses,
and how the leg ends when its partner does -- cleanly, or with a reset
(:mod:`tunnelpass.relay.closing`)."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from tunnelpass.relay import closing
from tunnelpass.carriers.stream import stream_of


def throttle(end, factory, count: int) -> None:
    """--rate on the copying path: stop reading *end*'s transport for as
    long as the instance's budget says (nothing is buffered to slow it
    down).  One pending resume per end, moved as the debt grows: one socket
    read can arrive as several calls (TLS records)."""
    delay = factory.limits.limiter.take(count)
    if delay <= 0:
        return
    end.transport.pauseProducing()
    call = end._resume_call
    if call is not None and call.active():
        call.reset(delay)  # *delay* repays the whole debt, this call's bytes included
    else:
        end._resume_call = factory.clock.callLater(delay, _resume_if_open, end)


def _resume_if_open(end) -> None:
    """The debt is paid: read *end* again -- unless it is closing, its read
    side has ended, or its peer (the consumer) still wants it paused: the
    consumer resumes it itself when its buffer drains, and resuming behind
    its back would let its buffer grow without bound."""
    end._resume_call = None
    transport = end.transport
    if not transport.connected or getattr(transport, "disconnecting", False) or end._read_closed or end._closing:
        return
    peer = end.peer_transport()
    if peer is not None and stream_of(peer).consumer_paused():
        return
    transport.resumeProducing()


def cancel_resume(end) -> None:
    call = end._resume_call
    if call is not None and call.active():
        call.cancel()
    end._resume_call = None


@implementer(IPushProducer)
class LegProducer:
    """Registered as the producer of the other leg's transport, in place of
    this leg's transport: pausing and resuming pass through, but Twisted
    "stops" the producer of a transport that died by calling its
    ``loseConnection`` -- a FIN on this leg, before the relay even hears of
    the loss, which would make a cut stream look complete.  How a leg ends
    is the relay's decision (:meth:`RelayEnd._end_partner`), so stopping
    does nothing here."""

    __slots__ = ("transport",)

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """One leg of a relay: half-close bookkeeping and how the leg ends.

    Twisted reports each half of a TCP connection separately and never
    closes the socket by itself once both halves are done, so each end
    closes its transport when it has both received and sent a FIN.

    When a leg is lost, its partner ends the same way: cleanly (both FINs
    crossed, or a close the relay asked for) or abnormally -- then the
    partner delivers what it already holds and is reset, so the far peer
    sees ECONNRESET and never mistakes a cut stream for a complete one
    (:mod:`tunnelpass.relay.closing`).  Closing a leg that is already closing or
    gone does nothing; no close path raises.
    """

    _read_closed = False
    _write_closed = False
    _resume_call = None  # --rate: when reading this end resumes
    _producing = False  # the partner's transport is registered as this one's producer
    _lost = False  # connectionLost has run
    _closing: str | None = None  # what the relay asked of this leg: "close", "reset" or "abort"
    _resetter: closing.FlushThenReset | None = None

    def peer_end(self) -> "RelayEnd | None":
        raise NotImplementedError

    def relay_factory(self) -> "TCPForwardFactory":
        raise NotImplementedError

    def peer_transport(self):
        peer = self.peer_end()
        return peer.transport if peer is not None else None

    def readConnectionLost(self) -> None:
        self._read_closed = True
        peer = self.peer_end()
        if peer is None:
            if not getattr(self, "_early", None):  # EOF before the remote answered: nothing to relay
                self.close_cleanly()
            return  # else the FIN follows the early bytes once the remote answers
        peer.half_close()
        if self._write_closed:
            self.close_cleanly()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        if self._read_closed:
            self.close_cleanly()

    # How this leg ends

    def ended_cleanly(self, reason) -> bool:
        """Whether this leg's stream ended complete: both FINs crossed (or
        both close_notify alerts), or it closed because the relay asked for
        a clean close.  A reset, a TLS error, a TLS EOF without close_notify
        (Twisted reports ``ConnectionLost``), a FIN after the peer's
        close_notify but before ours, our own abort: abnormal."""
        if self._read_closed and self._write_closed:
            return True
        return self._closing == "close" and (reason is None or reason.check(ConnectionDone) is not None)

    def half_close(self) -> None:
        """The partner sent FIN: pass it on after what it sent before."""
        if self._lost or self._closing:
            return
        if not closing.half_close_after_flush(self.transport, self._producing):
            self._closing = "close"
            self.relay_factory().closing.add(self)

    def close_cleanly(self) -> None:
        """Close after the buffer is written (FIN / close_notify)."""
        if self._lost or self._closing:
            return
        self._closing = "close"
        self.relay_factory().closing.add(self)
        closing.close_after_flush(self.transport, self._producing)

    def reset(self, flush: bool = True) -> None:
        """End this leg with an RST: after what it holds is delivered (at
        most :data:`~tunnelpass.relay.closing.FLUSH_LIMIT`), or at once."""
        if self._lost or self._closing == "abort" or (flush and self._closing == "reset"):
            return
        self.relay_factory().closing.add(self)
        if flush:
            self._closing = "reset"
            self._resetter = closing.FlushThenReset(self.transport, self.relay_factory().clock,
                                                    unregister=self._producing)
            self._resetter.start()
            return
        self._closing = "abort"
        if self._resetter is not None:
            self._resetter.now()
        else:
            closing.abort(self.transport)

    def _end_partner(self, reason) -> None:
        """This leg is lost: end the partner the same way."""
        self._lost = True
        cancel_resume(self)
        if self._resetter is not None:
            self._resetter.cancel()
        factory = self.relay_factory()
        peer = self.peer_end()
        if peer is not None:
            if self.ended_cleanly(reason):
                peer.close_cleanly()
            elif not (peer._lost or peer._closing in ("reset", "abort")):
                factory.log.debug("{listener}: a leg ended abnormally ({reason}); resetting the other",
                                  listener=factory.name, reason=_describe(reason))
                peer.reset()
        factory.leg_closed(self)


def _describe(reason) -> str:
    if reason is None:
        return "closed"
    try:
        return reason.getErrorMessage()
    except Exception:
        return repr(reason)
