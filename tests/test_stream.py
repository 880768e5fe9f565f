"""The stream interface: Twisted's TCP transport adapted, and what the
relay asks of a stream instead of reading transport internals."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.helpers import RelayTransport, until
from tunnelpass.carriers.stream import IStream, TCPStream, stream_of


class _Hold(Protocol):
    def __init__(self):
        self.made = Deferred()
        self.received = []

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received.append(data)


class TCPStreamTests(TestCase):
    async def _pair(self):
        server = _Hold()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        from twisted.internet.protocol import ClientCreator
        client = await ClientCreator(reactor, _Hold).connectTCP("127.0.0.1", port.getHost().port)
        await server.made
        self.addCleanup(client.transport.abortConnection)
        self.addCleanup(server.transport.abortConnection)
        return client, server

    async def test_a_tcp_transport_is_adapted(self):
        client, _ = await self._pair()
        stream = stream_of(client.transport)
        self.assertIsInstance(stream, TCPStream)
        verifyObject(IStream, stream)
        self.assertTrue(stream.half_closes)
        self.assertIsNone(stream.secured)
        self.assertEqual(stream.peer_fingerprint(), b"")
        self.assertEqual(stream.peer_certificates(), [])

    async def test_a_stream_provider_is_itself(self):
        transport = RelayTransport()
        self.assertIs(stream_of(transport), transport)

    async def test_unsent_and_native_end_follow_twisteds_buffer(self):
        client, server = await self._pair()
        stream = stream_of(client.transport)
        self.assertEqual(stream.unsent(), 0)
        self.assertIsNotNone(stream.native_end())  # nothing buffered: an engine may take the socket
        client.transport.write(b"x" * 1000)  # Twisted holds it until the reactor runs
        self.assertGreaterEqual(stream.unsent(), 1000)
        self.assertIsNone(stream.native_end())  # an engine would skip the buffered bytes
        await until(lambda: sum(map(len, server.received)) == 1000)
        await until(lambda: stream.unsent() == 0)

    async def test_consumer_paused_is_the_write_side_being_full(self):
        client, server = await self._pair()
        stream = stream_of(client.transport)
        stream.set_write_buffer(1024)
        self.assertEqual(client.transport.bufferSize, 1024)
        producer = RelayTransport()
        client.transport.registerProducer(producer, True)
        self.assertFalse(stream.consumer_paused())
        client.transport.write(b"y" * 4096)  # past the buffer size: the producer is paused
        self.assertTrue(stream.consumer_paused())
        self.assertEqual(producer.producerState, "paused")
        await until(lambda: not stream.consumer_paused())
        client.transport.unregisterProducer()

    async def test_attach_delivers_early_bytes_first(self):
        client, _ = await self._pair()
        stream = stream_of(client.transport)
        taker = _Hold()
        stream.attach(taker, b"early")
        self.assertIs(taker.transport, client.transport)
        self.assertEqual(taker.received, [b"early"])
