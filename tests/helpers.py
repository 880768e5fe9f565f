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


async def until(predicate, timeout=5.0):
    """Let the real reactor run until *predicate()* is true (bounded)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached")
