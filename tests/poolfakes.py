"""Test doubles for the pool as the stream opener sees it."""

from tests.helpers import RelayTransport
from tunnelpass.wire.codec import FrameDecoder
from tunnelpass.wire.datagrams import DatagramDecoder


class MemberStream(RelayTransport):
    """The stream of a fake pool member: a RelayTransport (an IStream) that
    remembers the protocol attached to it."""

    protocol = None

    def attach(self, protocol, data=b""):
        self.protocol = protocol
        super().attach(protocol, data)


class PoolMember:
    """Stands in for an idle pool connection (the client's PoolConnection,
    the server's TunnelConnection): :meth:`claim` hands out its stream once,
    and only while it is open."""

    def __init__(self):
        self.transport = MemberStream()
        self.claims = 0

    @property
    def protocol(self):
        return self.transport.protocol

    def claim(self):
        if self.claims or not self.transport.connected or self.transport.disconnecting:
            return None
        self.claims += 1
        return self.transport

    def close(self):
        self.transport.loseConnection()

    def sent_frames(self):
        """The OPEN frame written first, and the datagrams after it."""
        data = self.transport.value()
        decoder = FrameDecoder()
        (open_frame,) = decoder.feed(data, max_frames=1)
        return open_frame, DatagramDecoder().feed(decoder.take_rest())
