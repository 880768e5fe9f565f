# -*- test-case-name: tests.test_dispatch -*-
"""The dialling side's one OPEN dispatcher.

The side that dials ``--target`` (the server in the send flow, the client in
the receive flow) learns what a claimed pool connection carries from its
first frame: OPEN (a TCP user, with the user's addresses for
``--proxy-protocol``) or OPEN_UDP (a UDP session).  :class:`OpenReader`
reads that frame (sans-IO: bytes in, the announcement out) and checks it
names the connection it arrived on; :class:`OpenDispatcher`, the
:class:`~tunnelpass.carriers.stream.IStreamAcceptor` of both ends, dials the target
for a TCP stream or opens a UDP egress session for a UDP one, and attaches
the result to the stream.  A stream it cannot serve (``--no-tcp``,
``--no-udp``, a full session table, an unknown kind) is aborted: that
connection only, the far side's user sees a refusal.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from tunnelpass.wire.codec import OPENS, FrameDecoder, ProtocolError, Type, decode_open
from tunnelpass.carriers.stream import TCP, UDP, IStreamAcceptor

KINDS = {Type.OPEN: TCP, Type.OPEN_UDP: UDP}

log = Logger(namespace="tunnelpass.dispatch")


class OpenReader:
    """Reads the OPEN / OPEN_UDP frame a claimed pool connection starts with.

    :meth:`feed` returns None until the frame is complete, then ``(kind,
    addresses, rest)`` -- *rest* is what followed it in the same read (the
    user's first bytes).  It raises :class:`~tunnelpass.wire.codec.ProtocolError`
    for anything else, and for an OPEN naming another connection (ids are
    single-use: a frame for another id is a confused or forged peer)."""

    __slots__ = ("conn_id", "_decoder")

    def __init__(self, conn_id: bytes):
        self.conn_id = conn_id
        self._decoder = FrameDecoder(allowed=OPENS)

    def feed(self, data: bytes):
        frames = self._decoder.feed(data, max_frames=1)
        if not frames:
            return None
        frame = frames[0]
        conn_id, addresses = decode_open(frame.payload)
        if conn_id != self.conn_id:
            raise ProtocolError("OPEN for another connection")
        return KINDS[frame.type], addresses, self._decoder.take_rest()


@implementer(IStreamAcceptor)
class OpenDispatcher:
    """Serves the streams the far side opens: TCP to *target_factory* (a
    :class:`~tunnelpass.relay.relay.TCPForwardFactory` dialling the target
    group), UDP to *udp_egress* (:class:`~tunnelpass.tunnel.udpegress.UDPEgress`).
    *tcp* False is ``--no-tcp`` (``--no-udp`` is the egress's own)."""

    def __init__(self, target_factory, udp_egress, tcp: bool = True):
        self.target_factory = target_factory
        self.udp_egress = udp_egress
        self.tcp = tcp

    def stream_accepted(self, kind: str, addresses, stream, data: bytes = b"") -> bool:
        """Attach the protocol that serves *kind* to *stream* (True), or
        abort the stream (False)."""
        protocol = None
        if kind == TCP:
            if self.tcp:
                protocol = self.target_factory.buildProtocol(None)
                protocol.original = addresses  # the user's, for --proxy-protocol
            else:
                log.debug("TCP is disabled here (--no-tcp); closing a TCP pool connection")
        elif kind == UDP:
            protocol = self.udp_egress.open(addresses)  # None: refused (and said why)
        else:
            log.debug("unknown stream kind {kind!r}; closing the pool connection", kind=kind)
        if protocol is None:
            stream.abortConnection()
            return False
        stream.attach(protocol, data)
        return True
