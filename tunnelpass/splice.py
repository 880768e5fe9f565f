# -*- test-case-name: tests.test_splice -*-
"""Zero-copy relay for two plain TCP sockets on Linux (``os.splice``).

Bytes go socket -> pipe -> socket inside the kernel and never become Python
objects, which is how a Python relay outruns C relays that copy.  Once both
ends of a relay are connected (and nothing is buffered yet), the relay hands
both file descriptors to a :class:`SpliceRelay`; Twisted's transports stay
out of the reactor from then on and are only used to close the sockets and
to run the protocols' ``connectionLost``.

Pipes come from a small shared pool (:mod:`tunnelpass.pipes`): a direction borrows one only for the
moment it moves data and keeps it only while the receiver is not accepting
more (that pipe is then the direction's bounded buffer), so idle connections
hold no pipes and memory stays bounded when one side is slow.

Ends: when both FINs have crossed, both sockets close with a FIN.  When
one socket fails (reset, EPIPE, an error or hang-up the reactor reports),
what was already read from it is delivered to the other, which is then
reset (RST, after its kernel send queue has drained, at most
:data:`~tunnelpass.closing.FLUSH_LIMIT`): its peer sees ECONNRESET, never a
clean EOF.  :meth:`SpliceRelay.abort` resets both at once.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet.tcp import Connection as TCPConnection
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from tunnelpass.closing import FLUSH_LIMIT, FLUSH_POLL, socket_unsent
from tunnelpass.pipes import PIPE_SIZE, PIPES, POOL_LIMIT, PipePool  # noqa: F401 (PipePool, POOL_LIMIT: re-exported)

AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")

#: Seconds before retrying a direction that could not get a pipe (EMFILE).
PIPE_RETRY_DELAY = 0.05
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


class _Direction:
    """Bytes flowing from one socket to the other through a borrowed pipe."""

    __slots__ = ("src", "dst", "pipe", "pending", "eof", "done", "count", "throttled", "throttle_call")

    def __init__(self, src: "_Side", dst: "_Side", count):
        self.src, self.dst, self.count = src, dst, count
        self.pipe = None
        self.pending = 0  # bytes in the pipe, not yet written to dst
        self.eof = False  # src sent FIN
        self.done = False  # FIN passed on to dst
        self.throttled = False  # --rate: src is not read until its turn comes
        self.throttle_call = None


class _Side:
    """The reactor's view of one socket: readable = pump out of it,
    writable = flush the pipe that is waiting to go into it."""

    def __init__(self, relay: "SpliceRelay", transport):
        self.relay = relay
        self.transport = transport
        self.sock = transport.socket
        self.fd = self.sock.fileno()
        self.outgoing: _Direction | None = None  # data read from this socket
        self.incoming: _Direction | None = None  # data written to this socket

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "tunnelpass-splice"

    def doRead(self):
        self.relay.pump(self.outgoing)

    def doWrite(self):
        self.relay.flush(self.incoming)

    def connectionLost(self, reason) -> None:
        # The reactor saw an error or hang-up on this fd (or is shutting
        # down): this socket failed.
        self.relay.side_lost(self, reason)


class SpliceRelay:
    """Moves bytes both ways between two connected TCP transports.

    *on_activity* is called whenever bytes move (idle timer); *count_in* and
    *count_out* receive byte counts for the two directions.  When both
    directions have ended (or on error/abort) both transports' sockets are
    closed through their ``connectionLost``, so the protocols clean up as
    they would after any other close.
    """

    def __init__(self, reactor, inbound_transport, outbound_transport, on_activity,
                 count_in, count_out, pipes: PipePool = PIPES, limiter=None):
        self.reactor = reactor
        self.limiter = limiter
        self.pipes = pipes
        self.on_activity = on_activity
        self.finished = False
        self.failing: Failure | None = None
        self.broken: _Side | None = None  # the socket that failed first
        self._closing_call = None  # waiting for the kernel to send before the RST
        self._draining_call = None  # the bound on delivering a pipe's bytes after a failure
        self._aborted: Failure | None = None  # how the sockets close after a failure
        self.a = _Side(self, inbound_transport)
        self.b = _Side(self, outbound_transport)
        self.a.outgoing = self.b.incoming = _Direction(self.a, self.b, count_in)
        self.b.outgoing = self.a.incoming = _Direction(self.b, self.a, count_out)

    def start(self, to_outbound: bytes = b"", to_inbound: bytes = b"") -> bool:
        """Take both sockets over.  *to_outbound* / *to_inbound* are bytes
        already read in Python (e.g. what arrived with a tunnel header) that
        must reach that side first: they are preloaded into the direction's
        pipe.  Returns ``False``, touching nothing, when a prefix does not
        fit in a pipe (the caller then relays by copying)."""
        preloads = []
        for d, prefix in ((self.a.outgoing, to_outbound), (self.b.outgoing, to_inbound)):
            if prefix:
                try:
                    pipe = self.pipes.take()
                except OSError:
                    pipe = None
                try:
                    written = os.write(pipe[1], prefix) if pipe and len(prefix) <= pipe[2] else 0
                except OSError:
                    written = 0
                if written != len(prefix):
                    if pipe is not None:
                        self.pipes.discard(pipe)
                    for other, _ in preloads:
                        self.pipes.discard(other.pipe)
                        other.pipe, other.pending = None, 0
                    return False
                d.pipe, d.pending = pipe, written
                preloads.append((d, written))
        for side in (self.a, self.b):
            side.transport.stopReading()
            side.transport.stopWriting()
        self.reactor.addReader(self.a)
        self.reactor.addReader(self.b)
        for d, written in preloads:
            d.count(written)
            self.flush(d)
        return True

    # Data path

    def pump(self, d: _Direction) -> None:
        """src is readable: move what it has into a pipe, then on to dst."""
        if d.throttled:
            self.reactor.removeReader(d.src)
            return
        if self.finished or self.failing or d.eof or d.pending:
            return
        if d.pipe is None:
            try:
                d.pipe = self.pipes.take()
            except OSError:
                # Out of descriptors (EMFILE/ENFILE): leave the data in the
                # socket and try again shortly; the connection lives on.
                self._retry_later(d)
                return
        try:
            n = os.splice(d.src.fd, d.pipe[1], PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            n = None
        except OSError as e:
            self._fail(d.src, e)
            return
        if not n:
            # splice() says "nothing" (EAGAIN) or "EOF" (0) both when that is
            # true and when the next byte is TCP urgent data, which it cannot
            # move.  Peek to tell them apart; recv() steps over the mark.
            n = self._read_past_urgent_mark(d)
            if n is None:
                self._release_if_empty(d)
                return
            if n == 0:
                d.eof = True
                self.reactor.removeReader(d.src)
                self._release_if_empty(d)
                self._pass_eof(d)
                return
        d.pending = n
        d.count(n)
        self.on_activity()
        if self.limiter is not None:
            delay = self.limiter.take(n)
            if delay > 0:
                d.throttled = True
                d.throttle_call = self.reactor.callLater(delay, self._unthrottle, d)
        self.flush(d)

    def _read_past_urgent_mark(self, d: _Direction) -> int | None:
        """None: nothing to read now; 0: EOF; else bytes copied into the pipe."""
        try:
            peeked = d.src.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            self._fail(d.src, e)
            return None
        if not peeked:
            return 0
        try:
            # The pipe is empty here: read no more than it holds, so the
            # write below is whole and ``pending`` is exactly what it holds.
            data = d.src.sock.recv(d.pipe[2], socket.MSG_DONTWAIT)
            written = os.write(d.pipe[1], data) if data else 0
        except BlockingIOError:
            return None
        except OSError as e:
            self._fail(d.src, e)
            return None
        if written != len(data):  # cannot happen with an empty pipe; never drop silently
            self._fail(d.src, OSError(f"pipe took {written} of {len(data)} bytes"))
            return None
        return written or None

    def flush(self, d: _Direction) -> None:
        """dst is writable (or data just arrived): empty the pipe into it."""
        if self.finished:
            return
        while d.pending:
            try:
                n = os.splice(d.pipe[0], d.dst.fd, d.pending, flags=_FLAGS)
            except BlockingIOError:
                # dst is full: stop reading src until dst drains.
                self.reactor.removeReader(d.src)
                self.reactor.addWriter(d.dst)
                return
            except OSError as e:
                self._fail(d.dst, e)
                return
            d.pending -= n
        self.reactor.removeWriter(d.dst)
        self._release_if_empty(d)
        if self.failing:
            self.finish(self.failing)
        elif d.eof:
            self._pass_eof(d)
        elif not self.finished and not d.throttled:
            self.reactor.addReader(d.src)
        elif d.throttled:
            self.reactor.removeReader(d.src)

    def _unthrottle(self, d: _Direction) -> None:
        d.throttled, d.throttle_call = False, None
        if not (self.finished or self.failing or d.eof or d.pending):
            self.reactor.addReader(d.src)

    def _fail(self, broken: _Side, error: OSError) -> None:
        """*broken*'s socket failed (reset, EPIPE): deliver what is already
        read for the other socket, then close both -- as the copying relay
        flushes a transport's buffer before closing it."""
        reason = Failure(ConnectionLost(str(error)))
        if self.failing is not None:  # the second socket failed too
            self.broken = None
            self.finish(self.failing)
            return
        alive = self.b if broken is self.a else self.a
        self.failing, self.broken = reason, broken
        for side in (broken, alive):
            self.reactor.removeReader(side)
        self.reactor.removeWriter(broken)
        if broken.outgoing.pending:
            self.reactor.addWriter(alive)  # flush() finishes when it is empty...
            # ...or a peer that does not read is reset FLUSH_LIMIT from now.
            self._draining_call = self.reactor.callLater(FLUSH_LIMIT, self.finish, reason)
        else:
            self.finish(reason)

    def _retry_later(self, d: _Direction) -> None:
        self.reactor.removeReader(d.src)

        def retry():
            if not (self.finished or self.failing or d.eof or d.pending):
                self.reactor.addReader(d.src)

        self.reactor.callLater(PIPE_RETRY_DELAY, retry)

    def _release_if_empty(self, d: _Direction) -> None:
        if d.pipe is not None and not d.pending:
            self.pipes.give(d.pipe)
            d.pipe = None

    def _pass_eof(self, d: _Direction) -> None:
        """src sent FIN and everything before it reached dst: FIN dst."""
        if d.pending or d.done:
            return
        d.done = True
        try:
            d.dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.a.outgoing.done and self.b.outgoing.done:
            self.finish(Failure(ConnectionDone()))

    def side_lost(self, side: _Side, reason) -> None:
        if self.finished:
            self._close_now()  # e.g. the reactor shutting down during the final flush
            return
        self._fail(side, OSError(reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)))

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
            self.reactor.removeReader(side)
            self.reactor.removeWriter(side)
            call = side.outgoing.throttle_call
            if call is not None and call.active():
                call.cancel()
        for d in (self.a.outgoing, self.b.outgoing):
            if d.pipe is not None:
                if d.pending:
                    self.pipes.discard(d.pipe)  # never hand out a pipe with stale bytes
                else:
                    self.pipes.give(d.pipe)
                d.pipe = None
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
        if self.broken is None or not any(socket_unsent(side.sock) for side in alive):
            self._close_now()
            return
        self._deadline = self.reactor.seconds() + FLUSH_LIMIT
        self._closing_call = self.reactor.callLater(FLUSH_POLL, self._close_when_sent)

    def _close_when_sent(self) -> None:
        self._closing_call = None
        alive = [side for side in (self.a, self.b) if side is not self.broken]
        if self.reactor.seconds() < self._deadline and any(socket_unsent(side.sock) for side in alive):
            self._closing_call = self.reactor.callLater(FLUSH_POLL, self._close_when_sent)
            return
        self._close_now()

    def _close_now(self) -> None:
        call, self._closing_call = self._closing_call, None
        if call is not None and call.active():
            call.cancel()
        self._close(self._aborted or Failure(ConnectionAborted()))

    def _close(self, reason: Failure) -> None:
        for side in (self.a, self.b):
            if side.transport.connected:
                side.transport.connectionLost(reason)


def can_splice(*transports) -> bool:
    """Whether every transport is a plain (non-TLS) TCP socket transport
    with nothing left in Twisted's write buffer (splicing would skip it)."""
    if not AVAILABLE:
        return False
    for transport in transports:
        # Exactly Twisted's TCP transport: a TLS transport proxies attribute
        # lookups (``socket`` too) to the TCP transport beneath it.
        if not isinstance(transport, TCPConnection):
            return False
        if getattr(transport, "dataBuffer", b"") or getattr(transport, "_tempDataBuffer", None):
            return False
        sock = getattr(transport, "socket", None)
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            return False
        if getattr(transport, "TLS", False) or not hasattr(transport, "connectionLost"):
            return False
    return True
