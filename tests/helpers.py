"""Test doubles shared by the protocol-level tests."""

from twisted.internet.testing import StringTransport
from zope.interface import implementer

from tunnelpass.carriers.stream import IStream, attach


@implementer(IStream)
class RelayTransport(StringTransport):
    """A StringTransport that behaves like a TCP transport where the relay
    depends on it: half-close, unregisterProducer without a producer (both
    allowed by twisted.internet.abstract.FileDescriptor), and the rest of
    :class:`~tunnelpass.carriers.stream.IStream`; ``dataBuffer`` stands for bytes
    not yet sent."""

    write_closed = False
    half_closes = True
    secured = None
    producerPaused = False
    dataBuffer = b""
    offset = 0
    _tempDataLen = 0

    def attach(self, protocol, data=b""):
        attach(self, protocol, data)

    def consumer_paused(self):
        return self.producerPaused

    def unsent(self):
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def native_end(self):
        return None

    def set_write_buffer(self, size):
        self.bufferSize = size

    def local_fingerprint(self):
        return b""

    def peer_fingerprint(self):
        return b""

    def peer_certificates(self):
        return []

    def loseWriteConnection(self):
        self.write_closed = True

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None


async def until(predicate, timeout=5.0):
    """Let the real reactor run until *predicate()* is true (bounded)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached")
