# -*- test-case-name: tests.test_opener -*-
"""The listening side's one way to get a stream: claim an idle pool connection.

Both flows have a side that listens for users (the server's ``--target`` in
the receive flow, the client's in the send flow), over TCP and UDP.  Each
user -- a TCP connection, a UDP session -- needs one stream to the far
side.  :class:`PoolOpener` is the :class:`~tunnelpass.carriers.stream.IStreamOpener`
over the idle pool (:class:`~tunnelpass.carriers.pool.IdlePool`): it takes an idle
connection (waiting up to ``--pool-timeout`` when none is idle, in arrival
order), skips one that closed while idle, tells the far side what the
stream carries (OPEN or OPEN_UDP with the user's addresses, the first
bytes on the connection) and fires with the stream.  When no stream comes
it fails with :class:`~tunnelpass.carriers.stream.StreamUnavailable`; cancelling
the Deferred (the user hung up) gives up the wait.

What the pool holds are *pool members* (the client's
:class:`~tunnelpass.tunnel.clientpool.PoolConnection`, the server's
:class:`~tunnelpass.tunnel.gate.TunnelConnection`): each offers ``claim()``, its
stream if it is still open (and then no longer idle), else None.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from tunnelpass.wire.codec import Type, encode_open
from tunnelpass.carriers.pool import PoolFull, PoolTimeout
from tunnelpass.carriers.stream import TCP, UDP, IStreamOpener, StreamUnavailable, write_now

FRAME_TYPES = {TCP: Type.OPEN, UDP: Type.OPEN_UDP}


@implementer(IStreamOpener)
class PoolOpener:
    """:class:`~tunnelpass.carriers.stream.IStreamOpener` over an idle pool.

    *pool_source()* is the pool to take from now (None: no session);
    *unavailable* is why a user is refused then.  *on_claim(conn_id)* is
    told of every connection handed out (the client refills its pool)."""

    def __init__(self, pool_source, unavailable: str = "not connected", on_claim=None):
        self.pool_source = pool_source
        self.unavailable = unavailable
        self.on_claim = on_claim

    def open(self, kind: str, addresses=None) -> Deferred:
        frame_type = FRAME_TYPES.get(kind)
        if frame_type is None:
            raise ValueError(f"unknown stream kind {kind!r}")
        source, destination = addresses if addresses is not None else (None, None)
        return self._take(frame_type, source, destination)

    def _take(self, frame_type, source, destination) -> Deferred:
        pool = self.pool_source()
        if pool is None:
            return fail(StreamUnavailable(self.unavailable))
        d = pool.take()

        def taken(result):
            conn_id, member = result
            stream = member.claim()
            if stream is None:
                # Closed while idle (its removal is underway): the next one,
                # chained so that cancelling the user's wait cancels this.
                return self._take(frame_type, source, destination)
            # Straight to the socket: Twisted's write buffer stays empty, so
            # the relay can still hand both sockets to the zero-copy engine.
            write_now(stream, encode_open(conn_id, source, destination, frame_type))
            if self.on_claim is not None:
                self.on_claim(conn_id)
            return stream

        def unavailable(failure):
            failure.trap(PoolTimeout, PoolFull)
            raise StreamUnavailable(failure.getErrorMessage())

        return d.addCallbacks(taken, unavailable)
