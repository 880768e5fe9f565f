"""Test doubles shared by the protocol-level tests."""

from twisted.internet.testing import StringTransport


class RelayTransport(StringTransport):
    """A StringTransport that behaves like a TCP transport where the relay
    depends on it: half-close, and unregisterProducer without a producer
    (both allowed by twisted.internet.abstract.FileDescriptor)."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None
