# -*- test-case-name: tests.test_pump -*-
"""The copy pump: a native relay engine for when one or both ends are TLS
done by OpenSSL on the socket (:class:`~tunnelpass.carriers.nativeend.TLSEnd`).

One readiness event is one read into a buffer shared by every relay in the
process (the reactor is single-threaded, and each chunk is written out
before the next event) and one write to the other socket: no reactor
iteration in between, no Python object per chunk beyond the memoryview
slice that says how much to send.  Only when the receiver does not take
everything is the remainder copied out and held (at most one chunk per
direction); the source is then not read until the receiver has drained it,
so a slow receiver bounds memory.  Idle relays hold no buffer at all.

A TLS source hands out one record (<= 16 KiB) per read: the pump reads
records into the chunk while they keep coming whole (or OpenSSL still
holds decrypted bytes, :meth:`~tunnelpass.carriers.stream.INativeEnd.pending`, which
no readiness event announces) and then writes the chunk in one call.

Sides, directions, ends, ``--rate`` and teardown are
:class:`~tunnelpass.relay.relayengine.RelayEngine`'s.
"""

from __future__ import annotations

from tunnelpass.carriers.stream import NeedWrite
from tunnelpass.relay.relayengine import Direction, RelayEngine

#: Bytes one read may bring in: the shared buffer's size.
CHUNK = 256 * 1024
#: The most plaintext one TLS record carries: a full one suggests more follow.
TLS_RECORD = 16384

_BUFFER = bytearray(CHUNK)
_VIEW = memoryview(_BUFFER)


class PumpRelay(RelayEngine):
    """Moves bytes both ways between two native ends by copying through
    the shared buffer (see the module doc)."""

    log_prefix = "tunnelpass-pump"

    def preload(self, d: Direction, prefix: bytes) -> bool:
        d.held, d.pending = prefix, len(prefix)
        return True

    def unload(self, d: Direction) -> None:
        d.held, d.pending = None, 0

    def release(self, d: Direction) -> None:
        d.held, d.pending = None, 0

    def pump(self, d: Direction) -> None:
        """src is readable: read a chunk into the shared buffer and write
        it to dst at once; hold only what dst does not take."""
        if d.throttled:
            self.stop_reading(d.src)
            return
        if self.finished or self.failing or d.eof or d.pending:
            return
        side = d.src
        src = side.end
        view = _VIEW
        got = 0
        error = None
        n = None
        wait = None  # the source named a readiness to wait for after a partial read
        try:
            n = src.recv_into(view)
            while n:
                got += n
                if not side.tls or got >= CHUNK or (n < TLS_RECORD and not src.pending()):
                    break
                n = src.recv_into(view[got:])
        except BlockingIOError as e:  # EAGAIN, NeedRead, NeedWrite
            if not got:
                self.wait_to_read(d, e)
                return
            n = None  # deliver what came, then wait as the source said
            wait = e
        except OSError as e:
            error = e
        if n == 0:  # the source's clean end of data (FIN; close_notify)
            d.eof = True
            self.stop_reading(side)
        if got:
            self.moved(d, got)
            self._deliver(d, got)
            if isinstance(wait, NeedWrite) and not (self.finished or self.failing):
                self.wait_to_read(d, wait)  # TLS must write before it reads on: readable would not come
        elif d.eof:
            self.pass_eof(d)
        if error is not None:
            self.fail(side, error)

    def _deliver(self, d: Direction, got: int) -> None:
        """Write the *got* bytes in the shared buffer to dst; hold the rest."""
        try:
            written = d.dst.end.send(_VIEW[:got])
            blocked = None
        except BlockingIOError as e:
            written, blocked = 0, e
        except OSError as e:
            self.fail(d.dst, e)
            return
        if written < got:
            d.held = _VIEW[written:got].tobytes()  # the one copy, only for a slow receiver
            d.pending = got - written
            self.wait_to_write(d, blocked or BlockingIOError())
            return
        if d.eof:
            self.pass_eof(d)
        elif d.throttled:
            self.stop_reading(d.src)
        elif got >= CHUNK and d.src.tls and d.src.end.pending():
            # The chunk filled up with decrypted bytes still inside OpenSSL:
            # no readiness event will announce them; read on next iteration.
            self.reactor.callLater(0, self.resume_reading, d)

    def flush(self, d: Direction) -> None:
        """dst is writable: write what is held for it."""
        if self.finished:
            return
        if d.pending:
            try:
                written = d.dst.end.send(d.held)
            except BlockingIOError as e:
                self.wait_to_write(d, e)
                return
            except OSError as e:
                self.fail(d.dst, e)
                return
            if written < d.pending:
                d.held = memoryview(d.held)[written:]
                d.pending -= written
                self.wait_to_write(d, BlockingIOError())
                return
            d.held, d.pending = None, 0
        self.flushed(d)
