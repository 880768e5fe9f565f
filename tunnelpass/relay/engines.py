# -*- test-case-name: tests.test_pump -*-
"""Which native engine relays a pair of streams, asked through the stream
interface only (:meth:`~tunnelpass.carriers.stream.IStream.native_end`): two plain
sockets -> :class:`~tunnelpass.relay.splice.SpliceRelay`, two native ends of
which at least one is TLS -> :class:`~tunnelpass.relay.pump.PumpRelay`, anything
else -- or ``--zero-copy off`` -- None (the relay then joins the two
through Twisted, producer to consumer)."""

from __future__ import annotations

from tunnelpass.relay import splice
from tunnelpass.relay.pump import PumpRelay
from tunnelpass.carriers.stream import IStream


def native_end(transport):
    """*transport*'s stream's native end, or None (not a stream, a stream
    without a socket of its own, or one holding unwritten data)."""
    stream = IStream(transport, None)
    return stream.native_end() if stream is not None else None


def engine_for(reactor, inbound_transport, outbound_transport, zero_copy: bool,
               on_activity, count_in, count_out, limiter=None):
    """An engine (not started) for relaying the two transports, or None.

    *count_in* counts inbound -> outbound bytes, *count_out* the reverse;
    *on_activity* is called whenever bytes move (idle timer); *limiter* is
    ``--rate``'s.  Start it with ``engine.start(to_outbound=...)``: when
    that returns False, relay through Twisted instead."""
    if not zero_copy:
        return None  # --zero-copy off: every byte through Twisted's transports
    inbound = native_end(inbound_transport)
    if inbound is None:
        return None
    outbound = native_end(outbound_transport)
    if outbound is None:
        return None
    if inbound.kind == "socket" and outbound.kind == "socket":
        if splice.AVAILABLE:
            return splice.SpliceRelay(reactor, inbound, outbound, on_activity, count_in, count_out,
                                      limiter=limiter)
        return None
    return PumpRelay(reactor, inbound, outbound, on_activity, count_in, count_out, limiter=limiter)
