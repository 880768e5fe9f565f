# -*- test-case-name: tests.test_pump,tests.test_splice -*-
"""What the native relay engines share: two sockets driven by the reactor's
readiness events, with Twisted's transports out of the loop.

A relay engine moves bytes both ways between two
:class:`~tunnelpass.carriers.stream.INativeEnd` s (a plain socket, or TLS done by
OpenSSL on the socket).  The *mover* -- how bytes get from one end to the
other -- is the subclass's: :class:`tunnelpass.relay.splice.SpliceRelay` (socket
-> kernel pipe -> socket) or :class:`tunnelpass.relay.pump.PumpRelay` (one shared
buffer, ``recv_into`` then ``send``).  Everything else lives here once:

* the two sides registered with the reactor and the two directions, each
  of which stops reading its source while its destination holds bytes it
  has not taken (at most one chunk per direction is held);
* TLS readiness: a read that needs the socket writable, or a write that
  needs it readable, waits on the right event (:class:`NeedRead` /
  :class:`NeedWrite`) and never busy-loops;
* EOF and half-close: a direction's end of data is passed on once what
  came before it is delivered (FIN; close_notify alone, retried when the
  socket is writable);
* ends: clean when both ends of data have crossed; when one socket fails
  (reset, TLS truncation or error, EPIPE, a hang-up the reactor reports),
  what was read from it is delivered to the other for at most
  :data:`~tunnelpass.relay.closing.FLUSH_LIMIT`, then the other is reset (RST
  after its kernel send queue drained, bounded too): its peer sees
  ECONNRESET, never a clean EOF.  :meth:`RelayEngine.abort` resets both;
* ``--rate`` (*limiter*), the idle timer (*on_activity*) and the byte
  counters (*count_in*, *count_out*).

The Twisted transports are used only to close the sockets and to run the
protocols' ``connectionLost``.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from tunnelpass.relay.closing import FLUSH_LIMIT, FLUSH_POLL, quietly
from tunnelpass.relay.enginepoll import poller_for
from tunnelpass.carriers.stream import INativeEnd, IStream, NeedRead, NeedWrite


def as_end(end_or_transport):
    """*end_or_transport* as an :class:`INativeEnd` (asked of its stream
    when it is a transport); ValueError when it has none."""
    if INativeEnd.providedBy(end_or_transport):
        return end_or_transport
    stream = IStream(end_or_transport, None)
    end = stream.native_end() if stream is not None else None
    if end is None:
        raise ValueError(f"{end_or_transport!r} offers no native end")
    return end


class Direction:
    """Bytes flowing from one side's socket to the other's."""

    __slots__ = ("src", "dst", "count", "pending", "eof", "done", "shutting", "throttled", "throttle_call",
                 "read_needs_write", "write_needs_read", "pipe", "held")

    def __init__(self, src: "Side", dst: "Side", count):
        self.src, self.dst, self.count = src, dst, count
        self.pending = 0  # bytes read from src, held for dst (the mover's buffer)
        self.eof = False  # src ended its data
        self.done = False  # that end passed on to dst
        self.shutting = False  # passing it on waits for dst to be writable
        self.throttled = False  # --rate: src is not read until its turn comes
        self.throttle_call = None
        self.read_needs_write = False  # TLS: reading src waits for src writable
        self.write_needs_read = False  # TLS: writing dst waits for dst readable
        self.pipe = None  # splice: the borrowed pipe
        self.held = None  # pump: the bytes dst has not taken


class Side:
    """The reactor's view of one socket."""

    def __init__(self, relay: "RelayEngine", end):
        self.relay = relay
        self.end = end
        self.transport = end.transport
        self.fd = end.fileno()
        self.tls = end.kind == "tls"  # reads come one record at a time; pending() matters
        self.outgoing: Direction | None = None  # data read from this socket
        self.incoming: Direction | None = None  # data written to this socket

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return self.relay.log_prefix

    def doRead(self):
        self.relay.readable(self)

    def doWrite(self):
        self.relay.writable(self)

    def connectionLost(self, reason) -> None:
        # The reactor saw an error or hang-up on this fd (or is shutting
        # down): this socket failed.
        self.relay.side_lost(self, reason)


class RelayEngine:
    """Moves bytes both ways between two native ends (see the module doc).

    *inbound* and *outbound* are :class:`~tunnelpass.carriers.stream.INativeEnd` s
    (or transports whose streams offer one);
    *count_in* counts inbound -> outbound bytes, *count_out* the reverse.
    """

    log_prefix = "tunnelpass-relay"

    def __init__(self, reactor, inbound, outbound, on_activity, count_in, count_out, limiter=None):
        self.reactor = reactor
        self.poller = poller_for(reactor)  # the engines' own epoll set (tunnelpass.relay.enginepoll)
        self.limiter = limiter
        self.on_activity = on_activity
        self.finished = False
        self.failing: Failure | None = None
        self.broken: Side | None = None  # the socket that failed first
        self._closing_call = None  # waiting for the kernel to send before the RST
        self._draining_call = None  # the bound on delivering held bytes after a failure
        self._aborted: Failure | None = None  # how the sockets close after a failure
        self.a = Side(self, as_end(inbound))
        self.b = Side(self, as_end(outbound))
        self.a.outgoing = self.b.incoming = Direction(self.a, self.b, count_in)
        self.b.outgoing = self.a.incoming = Direction(self.b, self.a, count_out)

    # What a mover provides

    def preload(self, d: Direction, prefix: bytes) -> bool:
        """Hold *prefix* in *d* for its destination; False if it cannot."""
        raise NotImplementedError

    def unload(self, d: Direction) -> None:
        """Drop what *d* holds (undo :meth:`preload`)."""
        raise NotImplementedError

    def pump(self, d: Direction) -> None:
        """*d*'s source is readable: move what it has towards *d*'s destination."""
        raise NotImplementedError

    def flush(self, d: Direction) -> None:
        """*d*'s destination is writable: write what *d* holds, then
        :meth:`flushed` once it is empty."""
        raise NotImplementedError

    def release(self, d: Direction) -> None:
        """The relay is finished: free what *d* holds."""

    # Start

    def start(self, to_outbound: bytes = b"", to_inbound: bytes = b"") -> bool:
        """Take both sockets over.  *to_outbound* / *to_inbound* are bytes
        already read in Python (e.g. what arrived with a tunnel header) that
        must reach that side first.  Returns ``False``, touching nothing,
        when the mover cannot hold a prefix (the caller then relays through
        Twisted)."""
        preloaded = []
        for d, prefix in ((self.a.outgoing, to_outbound), (self.b.outgoing, to_inbound)):
            if prefix:
                if not self.preload(d, prefix):
                    for other in preloaded:
                        self.unload(other)
                    return False
                preloaded.append(d)
        for side in (self.a, self.b):
            side.transport.stopReading()
            side.transport.stopWriting()
        self.poller.addReader(self.a)
        self.poller.addReader(self.b)
        for d in preloaded:
            d.count(d.pending)
            self.flush(d)
        for d in (self.a.outgoing, self.b.outgoing):
            # Bytes the TLS library read ahead: no readiness event will tell.
            if not (self.finished or d.pending) and d.src.end.pending():
                self.pump(d)
        return True

    # Readiness

    def readable(self, side: Side) -> None:
        incoming = side.incoming
        if incoming.write_needs_read:
            incoming.write_needs_read = False
            self.flush(incoming)
        if not side.outgoing.read_needs_write:
            self.pump(side.outgoing)

    def writable(self, side: Side) -> None:
        outgoing, incoming = side.outgoing, side.incoming
        if outgoing.read_needs_write:
            outgoing.read_needs_write = False
            self.resume_reading(outgoing)
        if incoming.pending and not incoming.write_needs_read:
            self.flush(incoming)
        elif incoming.shutting:
            self.pass_eof(incoming)
        else:
            self.stop_writing(side)

    def stop_reading(self, side: Side) -> None:
        if not side.incoming.write_needs_read:
            self.poller.removeReader(side)

    def stop_writing(self, side: Side) -> None:
        incoming = side.incoming
        if not ((incoming.pending and not incoming.write_needs_read) or incoming.shutting
                or side.outgoing.read_needs_write):
            self.poller.removeWriter(side)

    def wait_to_read(self, d: Direction, error: BlockingIOError) -> None:
        """Reading *d*'s source would block: wait for what it named."""
        if isinstance(error, NeedWrite):
            d.read_needs_write = True
            self.stop_reading(d.src)
            self.poller.addWriter(d.src)

    def wait_to_write(self, d: Direction, error: BlockingIOError) -> None:
        """Writing *d*'s destination would block: stop reading the source
        (it holds a chunk) and wait for what the destination named."""
        self.stop_reading(d.src)
        if isinstance(error, NeedRead):
            d.write_needs_read = True
            self.poller.addReader(d.dst)
            self.stop_writing(d.dst)
        else:
            self.poller.addWriter(d.dst)

    def moved(self, d: Direction, n: int) -> None:
        """*n* bytes were read from *d*'s source: count them, keep the idle
        timer off, and take them from ``--rate``'s allowance."""
        d.count(n)
        self.on_activity()
        if self.limiter is not None:
            delay = self.limiter.take(n)
            if delay > 0:
                d.throttled = True
                d.throttle_call = self.reactor.callLater(delay, self._unthrottle, d)

    def flushed(self, d: Direction) -> None:
        """*d* holds nothing any more: go on reading, pass the EOF on, or
        finish the failure that was waiting for this delivery."""
        self.stop_writing(d.dst)
        if self.failing:
            self.finish(self.failing)
        elif d.eof:
            self.pass_eof(d)
        elif d.throttled:
            self.stop_reading(d.src)
        elif not self.finished:
            self.resume_reading(d)

    def resume_reading(self, d: Direction) -> None:
        if self.finished or self.failing or d.eof or d.pending or d.throttled:
            return
        self.poller.addReader(d.src)
        if d.src.end.pending():  # read ahead by TLS: no readiness event will come
            self.pump(d)

    def _unthrottle(self, d: Direction) -> None:
        d.throttled, d.throttle_call = False, None
        self.resume_reading(d)

    def source_ended(self, d: Direction) -> None:
        """*d*'s source sent its clean end of data."""
        d.eof = True
        self.stop_reading(d.src)
        self.pass_eof(d)

    def pass_eof(self, d: Direction) -> None:
        """src ended and everything before it reached dst: end dst's data."""
        if d.pending or d.done or self.finished:
            return
        try:
            sent = d.dst.end.shutdown_write()
        except BlockingIOError:
            sent = False
        except OSError:
            sent = True  # dst is broken: its next read says so
        if not sent:
            d.shutting = True  # close_notify waits for the socket to take it
            self.poller.addWriter(d.dst)
            return
        d.shutting, d.done = False, True
        self.stop_writing(d.dst)
        if self.a.outgoing.done and self.b.outgoing.done:
            self.finish(Failure(ConnectionDone()))

    # Failures

    def fail(self, broken: Side, error: OSError) -> None:
        """*broken*'s socket failed: deliver what is already read for the
        other socket (bounded), then close both (the other with an RST)."""
        reason = Failure(ConnectionLost(str(error) or type(error).__name__))
        if self.failing is not None:  # the second socket failed too
            self.broken = None
            self.finish(self.failing)
            return
        alive = self.b if broken is self.a else self.a
        self.failing, self.broken = reason, broken
        for side in (broken, alive):
            self.poller.removeReader(side)
        self.poller.removeWriter(broken)
        if broken.outgoing.pending:
            broken.outgoing.write_needs_read = False
            self.poller.addWriter(alive)  # flushed() finishes when it is empty...
            # ...or a peer that does not read is reset FLUSH_LIMIT from now.
            self._draining_call = self.reactor.callLater(FLUSH_LIMIT, self.finish, reason)
        else:
            self.finish(reason)

    def side_lost(self, side: Side, reason) -> None:
        if self.finished:
            self._close_now()  # e.g. the reactor shutting down during the final flush
            return
        self.fail(side, OSError(reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)))

    # Teardown

    def abort(self) -> None:
        """Reset both sockets now (idle timeout, end of a shutdown drain)."""
        if self.finished:
            self._close_now()  # cut a final flush short
            return
        self.broken = None
        self.finish(Failure(ConnectionAborted()))

    def finish(self, reason) -> None:
        """Stop both directions and close both sockets (once): with a FIN
        after a clean end, else with an RST (see the module doc)."""
        if self.finished:
            return
        self.finished = True
        call, self._draining_call = self._draining_call, None
        if call is not None and call.active():
            call.cancel()
        for side in (self.a, self.b):
            self.poller.removeReader(side)
            self.poller.removeWriter(side)
            call = side.outgoing.throttle_call
            if call is not None and call.active():
                call.cancel()
        for d in (self.a.outgoing, self.b.outgoing):
            self.release(d)
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        if reason.check(ConnectionDone):
            self._close(reason)
            return
        # Twisted closes a socket whose reason is ConnectionAborted with
        # SO_LINGER 0: an RST.  The socket that is still healthy first gets
        # to send what it was given (an RST would discard it).
        self._aborted = Failure(ConnectionAborted(reason.getErrorMessage()))
        alive = [side for side in (self.a, self.b) if side is not self.broken]
        if self.broken is None or not any(side.end.unsent() for side in alive):
            self._close_now()
            return
        self._deadline = self.reactor.seconds() + FLUSH_LIMIT
        self._closing_call = self.reactor.callLater(FLUSH_POLL, self._close_when_sent)

    def _close_when_sent(self) -> None:
        self._closing_call = None
        alive = [side for side in (self.a, self.b) if side is not self.broken]
        if self.reactor.seconds() < self._deadline and any(side.end.unsent() for side in alive):
            self._closing_call = self.reactor.callLater(FLUSH_POLL, self._close_when_sent)
            return
        self._close_now()

    def _close_now(self) -> None:
        call, self._closing_call = self._closing_call, None
        if call is not None and call.active():
            call.cancel()
        self._close(self._aborted or Failure(ConnectionAborted()))

    def _close(self, reason: Failure) -> None:
        for side in (self.a, self.b):  # one side's failure to close must not keep the other open
            if side.transport.connected:
                quietly("closing a relayed connection", side.transport.connectionLost, reason)
