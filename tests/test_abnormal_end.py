"""A broken stream never looks complete; closing never raises.

* Protocol level (StringTransport, MemoryReactorClock): how a relay ends
  its other leg when one leg is lost -- FIN after a clean end, reset after
  an abnormal one, with a bounded flush --, and that no close path raises.
* Real loopback sockets: a reset or a clean FIN on one leg, through each
  engine (copy, splice), as the far peer sees it; TLS half-close and
  truncation with :class:`~tunnelpass.carriers.tlshalf.HalfCloseTLSProtocol`.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tests.helpers import RelayTransport, until
from tunnelpass.relay import closing, splice
from tunnelpass.carriers import tls
from tunnelpass.relay.relay import ABORT_GRACE, TCPForwardFactory
from tunnelpass.config.limits import Limits
from tunnelpass.carriers.tlshalf import HalfCloseTLSEndpoint, HalfCloseTLSFactory


class LegTransport(RelayTransport):
    """Records how the relay ended it.  ``dataBuffer`` stands for bytes not
    yet sent (what :func:`tunnelpass.relay.closing.unsent` reads on a TCP
    transport)."""

    fail_on: tuple = ()  # method names that raise, as Twisted's TLS did on a dead connection

    def __init__(self):
        super().__init__()
        self.calls = []

    def _call(self, name):
        self.calls.append(name)
        if name in self.fail_on:
            raise AttributeError("'NoneType' object has no attribute 'shutdown'")

    def abortConnection(self):
        self._call("abort")
        self.disconnecting = self.disconnected = True

    def loseConnection(self):
        self._call("close")
        super().loseConnection()

    def loseWriteConnection(self):
        self._call("fin")
        super().loseWriteConnection()

    def unregisterProducer(self):
        self._call("unregister")
        super().unregisterProducer()


class RelayEndingTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = TCPForwardFactory(
            self.reactor, "127.0.0.1:1/tcp", "127.0.0.1", 9999, Limits(max_conns=5, connect_timeout=3, idle=60),
        )
        self.events = []
        self.factory.log = Logger(observer=self.events.append)

    def relay(self):
        inbound = self.factory.buildProtocol(None)
        in_t = LegTransport()
        inbound.makeConnection(in_t)
        outbound = self.reactor.tcpClients[-1][2].buildProtocol(None)
        out_t = LegTransport()
        outbound.makeConnection(out_t)
        return inbound, in_t, outbound, out_t

    @staticmethod
    def lose(protocol, transport, error):
        transport.connected = False
        protocol.connectionLost(Failure(error))

    def test_remote_reset_resets_the_client_not_fin(self):
        inbound, in_t, outbound, out_t = self.relay()
        outbound.dataReceived(b"partial answer")
        self.lose(outbound, out_t, ConnectionLost("Connection reset by peer"))
        self.assertEqual(in_t.value(), b"partial answer", "what was received is delivered")
        self.assertIn("abort", in_t.calls)
        self.assertNotIn("close", in_t.calls, "no FIN: the client must not take this for a complete stream")
        self.assertNotIn("fin", in_t.calls)
        self.assertEqual(in_t.producerState, "paused", "nothing more is read from the client")

    def test_client_reset_resets_the_remote(self):
        inbound, in_t, outbound, out_t = self.relay()
        self.lose(inbound, in_t, ConnectionLost())
        self.assertIn("abort", out_t.calls)
        self.assertNotIn("close", out_t.calls)
        self.assertEqual(self.factory.stats.active, 0)

    def test_reset_waits_for_the_backlog_then_resets(self):
        inbound, in_t, outbound, out_t = self.relay()
        in_t.dataBuffer = b"x" * 1000  # not yet written to the client's socket
        self.lose(outbound, out_t, ConnectionLost())
        self.assertNotIn("abort", in_t.calls)
        self.reactor.advance(0.5)
        self.assertNotIn("abort", in_t.calls, "still flushing")
        in_t.dataBuffer = b""
        self.reactor.advance(closing.FLUSH_POLL)
        self.assertEqual(in_t.calls.count("abort"), 1)

    def test_reset_flush_is_bounded(self):
        inbound, in_t, outbound, out_t = self.relay()
        in_t.dataBuffer = b"x" * 1000  # a client that never reads
        self.lose(outbound, out_t, ConnectionLost())
        self.reactor.advance(closing.FLUSH_LIMIT - 0.1)
        self.assertNotIn("abort", in_t.calls)
        self.reactor.advance(0.2)
        self.assertEqual(in_t.calls.count("abort"), 1)

    def test_clean_fin_is_still_a_fin(self):
        inbound, in_t, outbound, out_t = self.relay()
        outbound.readConnectionLost()  # the remote's FIN
        self.assertTrue(in_t.write_closed)
        inbound.readConnectionLost()  # the client's FIN
        self.assertTrue(out_t.write_closed)
        inbound.writeConnectionLost()
        outbound.writeConnectionLost()
        self.lose(outbound, out_t, ConnectionDone())
        self.lose(inbound, in_t, ConnectionDone())
        self.assertNotIn("abort", in_t.calls + out_t.calls)
        self.assertEqual(self.factory.relays, set())
        self.assertEqual(self.factory.closing, set())

    def test_close_notify_then_bare_fin_is_truncation(self):
        """TLS: the remote's close_notify ended its direction, but a FIN
        came before ours: the client's direction was cut."""
        inbound, in_t, outbound, out_t = self.relay()
        outbound.readConnectionLost()
        self.lose(outbound, out_t, ConnectionDone())
        self.assertIn("abort", in_t.calls)

    def test_idle_timeout_with_a_dead_tls_leg_never_raises(self):
        """The crash of the issue: abortConnection on a TLS connection that
        is already gone raised AttributeError out of timeoutConnection."""
        inbound, in_t, outbound, out_t = self.relay()
        out_t.fail_on = ("abort",)
        self.reactor.advance(61)  # must not raise
        self.assertIn("abort", in_t.calls)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.lose(inbound, in_t, ConnectionLost())
        self.assertEqual(self.factory.relays, set())

    def test_a_failing_close_path_still_ends_the_relay(self):
        """unregisterProducer raising on the other leg (a dead TLS
        connection) used to skip the relay's bookkeeping: the shutdown drain
        then waited forever."""
        inbound, in_t, outbound, out_t = self.relay()
        out_t.fail_on = ("unregister", "abort")
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.lose(inbound, in_t, ConnectionLost())
        self.assertEqual(self.factory.relays, set())
        self.assertEqual(self.factory.closing, {outbound}, "the remote leg could not be closed")
        self.reactor.advance(5)
        self.reactor.advance(ABORT_GRACE)
        self.assertEqual(done, [None], "the drain ends")
        self.flushLoggedErrors(AttributeError)

    def test_drain_ends_even_if_nothing_goes(self):
        inbound, in_t, outbound, out_t = self.relay()
        in_t.fail_on = out_t.fail_on = ("abort",)
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.reactor.advance(5)
        self.assertEqual(done, [])
        self.reactor.advance(ABORT_GRACE)
        self.assertEqual(done, [None])
        self.assertTrue(any("still closing" in str(e.get("log_format")) for e in self.events))
        self.flushLoggedErrors(AttributeError)

    def test_closing_twice_does_nothing(self):
        inbound, in_t, outbound, out_t = self.relay()
        in_t.dataBuffer = b"x"
        self.lose(outbound, out_t, ConnectionLost())  # flush, then reset
        inbound.abort()  # the idle timer or the drain cuts the flush short
        inbound.abort()
        self.reactor.advance(10)
        self.assertEqual(in_t.calls.count("abort"), 1)
        self.lose(inbound, in_t, ConnectionLost())
        inbound.abort()
        self.assertEqual(in_t.calls.count("abort"), 1)


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """A client or backend that records how its stream ended."""

    def __init__(self):
        self.data = bytearray()
        self.saw_fin = self.sent_fin = False
        self.made = Deferred()
        self.lost = Deferred()
        self.reason = None

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.saw_fin = True
        if self.sent_fin:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        self.sent_fin = True
        if self.saw_fin:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)

    def ended_with_reset(self) -> bool:
        return not self.saw_fin and self.reason is not None and self.reason.check(ConnectionLost) is not None

    async def ending(self):
        """Until the stream ends, either way (a FIN, or the connection lost)."""
        await until(lambda: self.saw_fin or self.lost.called, timeout=10)


class CopyEngineTests(unittest.TestCase):
    """Real loopback sockets through a forwarder factory, in-process."""

    zero_copy = False
    size = 1 << 20  # more than a pipe and Twisted's buffer hold

    async def relay(self):
        self.backends = []

        def backend():
            peer = Peer()
            self.backends.append(peer)
            return peer

        port = reactor.listenTCP(0, Factory.forProtocol(backend), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.factory = TCPForwardFactory(reactor, "t", "127.0.0.1", port.getHost().port, Limits(idle=0),
                                         zero_copy=self.zero_copy)
        listener = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.client = Peer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getHost().port), self.client)
        await until(lambda: self.backends and self.factory.relays)
        (self.inbound,) = self.factory.relays
        self.backend = self.backends[0]
        await self.backend.made
        await until(lambda: self.inbound.engine is not None or self.inbound.outbound is not None)
        self.assertEqual(self.inbound.engine is not None, self.zero_copy)
        self.addCleanup(self.cleanup)

    async def cleanup(self):
        for peer in (self.client, self.backend):
            if peer.transport.connected:
                peer.transport.abortConnection()
        await until(lambda: not (self.factory.relays or self.factory.closing))

    async def test_backend_reset_reaches_the_client_after_every_byte(self):
        await self.relay()
        self.client.transport.pauseProducing()  # what the relay read waits in its buffers
        payload = bytes(range(256)) * (self.size // 256)
        self.backend.transport.write(payload)
        await until(lambda: closing.unsent(self.backend.transport) == 0, timeout=20)
        self.backend.transport.abortConnection()  # RST
        await deferLater(reactor, 0.3)
        self.client.transport.resumeProducing()
        await self.client.ending()
        await until(lambda: len(self.client.data) == len(payload) or self.client.lost.called)
        self.assertTrue(self.client.ended_with_reset(), f"the client saw {self.client.reason}, FIN {self.client.saw_fin}")
        self.assertEqual(len(self.client.data), len(payload), "every byte read before the reset is delivered")
        self.assertEqual(bytes(self.client.data), payload)

    async def test_client_reset_reaches_the_backend(self):
        await self.relay()
        self.client.transport.write(b"q" * 1000)
        await until(lambda: len(self.backend.data) == 1000)
        self.client.transport.abortConnection()
        await self.backend.ending()
        self.assertTrue(self.backend.ended_with_reset(), f"the backend saw {self.backend.reason}, FIN {self.backend.saw_fin}")

    async def test_clean_fin_is_still_a_fin(self):
        await self.relay()
        self.backend.transport.write(b"whole answer")
        self.backend.transport.loseWriteConnection()
        await until(lambda: self.client.saw_fin)
        self.assertEqual(bytes(self.client.data), b"whole answer")
        self.client.transport.write(b"late request")
        self.client.transport.loseWriteConnection()
        await self.backend.lost
        self.assertTrue(self.backend.saw_fin)
        self.assertEqual(bytes(self.backend.data), b"late request")
        self.assertTrue(self.backend.reason.check(ConnectionDone))


class SpliceEngineTests(CopyEngineTests):
    zero_copy = True

    if not splice.AVAILABLE:
        skip = "os.splice is Linux-only"


class TLSEndingTests(unittest.TestCase):
    """HalfCloseTLSProtocol over a real loopback TLS connection."""

    async def pair(self):
        key, certificate = tls.self_signed()
        self.servers = []

        def server():
            peer = Peer()
            self.servers.append(peer)
            return peer

        factory = HalfCloseTLSFactory(tls.server_options(key, [certificate]), False, Factory.forProtocol(server))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = HalfCloseTLSEndpoint(tls.PinnedClientCreator(tls.fingerprint(certificate)),
                                        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        self.client = Peer()
        await endpoint.connect(Factory.forProtocol(lambda: self.client))
        self.client.transport.write(b"hello")
        await until(lambda: self.servers and self.servers[0].data == b"hello")
        self.server = self.servers[0]
        self.addCleanup(self.cleanup)

    async def cleanup(self):
        for peer in (self.client, self.server):
            if peer.transport.connected:
                peer.transport.abortConnection()
        await until(lambda: self.client.lost.called and self.server.lost.called)

    async def test_fin_without_close_notify_is_connection_lost(self):
        """Twisted 26.10 reports a TCP FIN with no close_notify before it as
        ConnectionLost (truncation), never as a clean end."""
        await self.pair()
        self.client.transport.transport.loseConnection()  # the TCP connection beneath TLS: a bare FIN
        await self.server.lost
        self.assertFalse(self.server.saw_fin)
        self.assertTrue(self.server.reason.check(ConnectionLost))
        self.assertFalse(self.server.reason.check(ConnectionDone))

    async def test_closing_a_gone_connection_never_raises(self):
        await self.pair()
        producer = self.client.transport  # any push producer will do
        self.server.transport.registerProducer(producer, True)
        self.client.transport.abortConnection()
        await self.server.lost
        await self.client.lost
        for transport in (self.server.transport, self.client.transport):
            transport.unregisterProducer()
            transport.abortConnection()
            transport.loseConnection()
            transport.loseWriteConnection()
            transport.abortConnection()

    async def test_abort_is_a_reset_without_close_notify(self):
        await self.pair()
        self.client.transport.abortConnection()
        await self.server.lost
        self.assertTrue(self.server.ended_with_reset())

    async def test_both_half_closes_are_reported_whoever_goes_first(self):
        """The relay counts a stream complete only when both directions
        ended cleanly: the side that sent its close_notify first must still
        hear of the peer's, and the other side of its own."""
        await self.pair()
        self.client.transport.loseWriteConnection()
        await until(lambda: self.server.saw_fin)
        self.server.written = []
        self.server.writeConnectionLost = lambda: (self.server.written.append(True),
                                                   self.server.transport.loseConnection())
        self.server.transport.write(b"answer after EOF")
        self.server.transport.loseWriteConnection()
        await until(lambda: self.client.lost.called and self.server.lost.called)
        self.assertTrue(self.client.saw_fin, "the client sent first and still hears the server's close_notify")
        self.assertEqual(self.server.written, [True], "the server received first and still hears its own")
        self.assertEqual(bytes(self.client.data), b"answer after EOF")
        self.assertTrue(self.client.reason.check(ConnectionDone))
        self.assertTrue(self.server.reason.check(ConnectionDone))
