# -*- test-case-name: tests.test_splice -*-
"""Zero-copy relay for two plain TCP sockets on Linux (``os.splice``).

Bytes go socket -> pipe -> socket inside the kernel and never become Python
objects, which is how a Python relay outruns C relays that copy.  The relay
asks both streams for their native end (:func:`tunnelpass.relay.engines.engine_for`);
when both are plain sockets it hands them to a :class:`SpliceRelay`.  What
every native engine does (sides, directions, EOF and failures, ``--rate``,
counters, teardown) is :class:`~tunnelpass.relay.relayengine.RelayEngine`'s; this
module is the mover.

Pipes come from a small shared pool (:mod:`tunnelpass.relay.pipes`): a direction borrows one only for the
moment it moves data and keeps it only while the receiver is not accepting
more (that pipe is then the direction's bounded buffer), so idle connections
hold no pipes and memory stays bounded when one side is slow.
"""

from __future__ import annotations

import os
import socket

from tunnelpass.relay.pipes import PIPE_SIZE, PIPES, POOL_LIMIT, PipePool  # noqa: F401 (PipePool, POOL_LIMIT: re-exported)
from tunnelpass.relay.relayengine import Direction, RelayEngine

AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")

#: Seconds before retrying a direction that could not get a pipe (EMFILE).
PIPE_RETRY_DELAY = 0.05
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0


class SpliceRelay(RelayEngine):
    """Moves bytes both ways between two plain TCP sockets
    (:class:`~tunnelpass.carriers.nativeend.SocketEnd` s) through kernel pipes."""

    log_prefix = "tunnelpass-splice"

    def __init__(self, reactor, inbound, outbound, on_activity, count_in, count_out,
                 pipes: PipePool = PIPES, limiter=None):
        super().__init__(reactor, inbound, outbound, on_activity, count_in, count_out, limiter=limiter)
        self.pipes = pipes

    def preload(self, d: Direction, prefix: bytes) -> bool:
        """Write *prefix* into a pipe of *d* (it must fit whole)."""
        try:
            pipe = self.pipes.take()
        except OSError:
            return False
        try:
            written = os.write(pipe[1], prefix) if len(prefix) <= pipe[2] else 0
        except OSError:
            written = 0
        if written != len(prefix):
            self.pipes.discard(pipe)
            return False
        d.pipe, d.pending = pipe, written
        return True

    def unload(self, d: Direction) -> None:
        self.pipes.discard(d.pipe)
        d.pipe, d.pending = None, 0

    def pump(self, d: Direction) -> None:
        """src is readable: move what it has into a pipe, then on to dst."""
        if d.throttled:
            self.stop_reading(d.src)
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
            self.fail(d.src, e)
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
                self._release_if_empty(d)
                self.source_ended(d)
                return
        d.pending = n
        self.moved(d, n)
        self.flush(d)

    def _read_past_urgent_mark(self, d: Direction) -> int | None:
        """None: nothing to read now; 0: EOF; else bytes copied into the pipe."""
        sock = d.src.end.sock
        try:
            peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            self.fail(d.src, e)
            return None
        if not peeked:
            return 0
        try:
            # The pipe is empty here: read no more than it holds, so the
            # write below is whole and ``pending`` is exactly what it holds.
            data = sock.recv(d.pipe[2], socket.MSG_DONTWAIT)
            written = os.write(d.pipe[1], data) if data else 0
        except BlockingIOError:
            return None
        except OSError as e:
            self.fail(d.src, e)
            return None
        if written != len(data):  # cannot happen with an empty pipe; never drop silently
            self.fail(d.src, OSError(f"pipe took {written} of {len(data)} bytes"))
            return None
        return written or None

    def flush(self, d: Direction) -> None:
        """dst is writable (or data just arrived): empty the pipe into it."""
        if self.finished:
            return
        while d.pending:
            try:
                n = os.splice(d.pipe[0], d.dst.fd, d.pending, flags=_FLAGS)
            except BlockingIOError as e:
                self.wait_to_write(d, e)  # dst is full: stop reading src until dst drains
                return
            except OSError as e:
                self.fail(d.dst, e)
                return
            d.pending -= n
        self._release_if_empty(d)
        self.flushed(d)

    def _retry_later(self, d: Direction) -> None:
        self.stop_reading(d.src)
        self.reactor.callLater(PIPE_RETRY_DELAY, self.resume_reading, d)

    def _release_if_empty(self, d: Direction) -> None:
        if d.pipe is not None and not d.pending:
            self.pipes.give(d.pipe)
            d.pipe = None

    def release(self, d: Direction) -> None:
        if d.pipe is not None:
            if d.pending:
                self.pipes.discard(d.pipe)  # never hand out a pipe with stale bytes
            else:
                self.pipes.give(d.pipe)
            d.pipe = None
