"""UDP sessions through the tunnel, sans sockets: a fake pool, fake UDP
ports and a fake clock drive both sides (the e2e tests use real ones)."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from tests.helpers import RelayTransport
from twisted.trial import unittest

from tunnelpass.wire.codec import Type, decode_open
from tunnelpass.wire.datagrams import DatagramDecoder, frame
from tests.poolfakes import PoolMember
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.wire.proxyproto import parse
from tunnelpass.relay.ratelimit import RateLimiter
from tunnelpass.config.limits import Limits
from tunnelpass.ops.stats import ListenerStats
from tunnelpass.tunnel import udpegress, udptunnel
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.tunnel.udptunnel import UDPIngress

USER = ("127.0.0.9", 5353)


class FakeUDPPort:
    """A listening (or connected) UDP socket that records what is written."""

    class socket:
        @staticmethod
        def setsockopt(*args):
            pass

    def __init__(self, protocol=None):
        self.protocol = protocol
        self.written = []
        self.connected_to = None
        self.stopped = False

    def write(self, datagram, addr=None):
        self.written.append((datagram, addr))

    def connect(self, host, port):
        self.connected_to = (host, port)

    def stopListening(self):
        self.stopped = True

    def getHost(self):
        class Host:
            host, port = "127.0.0.1", 8053
        return Host()


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.ports = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        udp = FakeUDPPort(protocol)
        protocol.transport = udp
        self.ports.append(udp)
        return udp


PoolConnection = PoolMember  # (the name other test modules import)


class IngressTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = ListenerStats()
        self.pool = IdlePool(self.clock, 16, lambda n: None, timeout=2.0)
        self.limits = Limits(udp_idle=30.0, max_sessions=3, max_conns=100)
        self.connections = []

    def listener(self, limits=None, udp_buffer=65535, pool=True, tcp_factory=None):
        listener = UDPIngress("target", self.clock, limits or self.limits, self.stats, udp_buffer,
                              PoolOpener((lambda: self.pool) if pool else (lambda: None)),
                              tcp_factory=tcp_factory)
        listener.transport = FakeUDPPort()
        return listener

    def idle(self, count=1):
        for i in range(count):
            connection = PoolConnection()
            self.connections.append(connection)
            self.pool.add(bytes([i]) * 16, connection)

    def test_session_opens_with_open_udp_and_carries_datagrams_both_ways(self):
        self.idle()
        listener = self.listener()
        listener.datagramReceived(b"query", USER)
        listener.datagramReceived(b"", USER)  # an empty datagram is a datagram
        connection = self.connections[0]
        open_frame, datagrams = connection.sent_frames()
        self.assertEqual(open_frame.type, Type.OPEN_UDP)
        conn_id, (source, destination) = decode_open(open_frame.payload)
        self.assertEqual((conn_id, source, destination), (b"\0" * 16, USER, ("127.0.0.1", 8053)))
        self.assertEqual(datagrams, [b"query", b""])
        connection.protocol.dataReceived(frame(b"answer") + frame(b"two")[:3])
        connection.protocol.dataReceived(frame(b"two")[3:])
        self.assertEqual(listener.transport.written, [(b"answer", USER), (b"two", USER)])
        self.assertEqual((self.stats.udp_sessions, self.stats.udp_datagrams_in, self.stats.udp_datagrams_out),
                         (1, 2, 2))

    def test_one_session_per_user_address(self):
        self.idle(2)
        listener = self.listener()
        listener.datagramReceived(b"a", USER)
        listener.datagramReceived(b"b", ("127.0.0.9", 5354))
        listener.datagramReceived(b"c", USER)
        self.assertEqual([c.sent_frames()[1] for c in self.connections], [[b"a", b"c"], [b"b"]])

    def test_datagrams_wait_for_a_pool_connection_bounded(self):
        listener = self.listener()
        for i in range(70):
            listener.datagramReceived(bytes([i]), USER)
        self.assertEqual(self.stats.udp_drops, 70 - 64)
        self.idle()
        _, datagrams = self.connections[0].sent_frames()
        self.assertEqual(datagrams, [bytes([i]) for i in range(64)])

    def test_no_pool_connection_in_time_ends_the_session(self):
        listener = self.listener()
        listener.datagramReceived(b"lost", USER)
        self.clock.advance(2.5)
        self.assertEqual(len(listener.sessions), 0)
        self.assertEqual((self.stats.udp_sessions, self.stats.udp_drops), (0, 1))

    def test_not_connected_drops(self):
        listener = self.listener(pool=False)
        listener.datagramReceived(b"x", USER)
        self.assertEqual((len(listener.sessions), self.stats.udp_drops), (0, 1))

    def test_full_transport_drops_instead_of_buffering(self):
        self.idle()
        listener = self.listener()
        listener.datagramReceived(b"first", USER)
        stream = self.connections[0].protocol
        self.assertIs(self.connections[0].transport.producer, stream)
        stream.pauseProducing()
        before = len(self.connections[0].transport.value())
        listener.datagramReceived(b"dropped", USER)
        self.assertEqual(len(self.connections[0].transport.value()), before)
        self.assertEqual(self.stats.udp_drops, 1)
        stream.resumeProducing()
        listener.datagramReceived(b"sent", USER)
        self.assertEqual(self.connections[0].sent_frames()[1], [b"first", b"sent"])

    def test_idle_session_expires_and_closes_its_connection(self):
        self.idle(2)
        listener = self.listener()
        listener.datagramReceived(b"x", USER)
        self.clock.advance(20)
        listener.datagramReceived(b"y", USER)  # traffic keeps it alive
        self.clock.advance(20)
        self.assertEqual(len(listener.sessions), 1)
        self.clock.advance(11)
        self.assertEqual(len(listener.sessions), 0)
        self.assertTrue(self.connections[0].transport.disconnecting)
        self.assertEqual(self.stats.udp_sessions, 0)
        listener.datagramReceived(b"z", USER)  # a new session, a new connection
        self.assertEqual(self.connections[1].sent_frames()[1], [b"z"])

    def test_connection_lost_ends_the_session(self):
        self.idle()
        listener = self.listener()
        listener.datagramReceived(b"x", USER)
        self.connections[0].protocol.connectionLost(None)
        self.assertEqual((len(listener.sessions), self.stats.udp_sessions), (0, 0))

    def test_max_sessions_and_slot(self):
        self.idle(5)
        listener = self.listener()
        for port in range(4):
            listener.datagramReceived(b"x", ("127.0.0.9", 6000 + port))
        self.assertEqual((len(listener.sessions), self.stats.udp_refused), (3, 1))

        class TCP:
            relays = {object(), object()}
        tcp = TCP()
        self.stats = ListenerStats()
        listener = self.listener(Limits(max_sessions=10, max_conns=3), tcp_factory=tcp)
        self.assertIs(tcp.udp_sessions, listener.sessions)  # TCP counts these too
        listener.datagramReceived(b"x", ("127.0.0.9", 1))
        listener.datagramReceived(b"x", ("127.0.0.9", 2))
        self.assertEqual((len(listener.sessions), self.stats.udp_refused), (1, 1))

    def test_oversized_datagram_dropped_whole(self):
        self.idle()
        listener = self.listener(udp_buffer=512)
        listener.datagramReceived(b"x" * 513, USER)
        listener.datagramReceived(b"x" * 512, USER)
        self.assertEqual(self.connections[0].sent_frames()[1], [b"x" * 512])
        self.connections[0].protocol.dataReceived(frame(b"r" * 513))
        self.assertEqual(listener.transport.written, [])
        self.assertEqual(self.stats.udp_drops, 2)

    def test_rate_limit_drops_over_budget(self):
        self.idle()
        limiter = RateLimiter(self.clock, 100_000)  # burst 65536 bytes
        listener = self.listener(Limits(limiter=limiter))
        for _ in range(10):
            listener.datagramReceived(b"x" * 10000, USER)
        self.assertEqual(len(self.connections[0].sent_frames()[1]), 6)
        self.assertEqual((self.stats.udp_drops, limiter.dropped_total), (4, 4))
        self.clock.advance(0.1)  # 10,000 bytes more budget
        listener.datagramReceived(b"x" * 10000, USER)
        self.assertEqual(len(self.connections[0].sent_frames()[1]), 7)

    def test_refused_twice_cools_the_address_down(self):
        self.idle(5)
        listener = self.listener()
        for i in range(2):  # closed at once, nothing answered: refused
            listener.datagramReceived(b"x", USER)
            self.connections[i].protocol.connectionLost(None)
        listener.datagramReceived(b"y", USER)
        self.assertEqual((len(listener.sessions), self.stats.udp_refused), (0, 1))
        self.assertEqual(len(self.pool.idle), 3, "no pool connection spent on a refused address")
        self.clock.advance(udptunnel.REFUSAL_COOL_DOWN)
        listener.datagramReceived(b"z", USER)
        self.assertEqual(self.connections[2].sent_frames()[1], [b"z"])
        # A session that ran a while (or got answers) ends without counting.
        self.clock.advance(2)
        self.connections[2].protocol.connectionLost(None)
        listener.datagramReceived(b"w", USER)
        self.connections[3].protocol.dataReceived(frame(b"answer"))
        self.connections[3].protocol.connectionLost(None)
        listener.datagramReceived(b"v", USER)
        self.assertEqual(self.connections[4].sent_frames()[1], [b"v"])

    def test_refusal_timed_from_getting_the_connection(self):
        listener = self.listener()
        for i in range(2):
            listener.datagramReceived(b"x", USER)
            self.clock.advance(1.5)  # a slow pool: the session waits, then is refused at once
            self.idle(1)
            self.connections[-1].protocol.connectionLost(None)
        listener.datagramReceived(b"y", USER)
        self.assertEqual(len(listener.sessions), 0, "cooled down")

    def test_own_closes_are_not_refusals(self):
        self.idle(6)
        listener = self.listener(Limits(udp_idle=0.5))
        for i in range(2):  # our own expiry, then the connection's end
            listener.datagramReceived(b"x", USER)
            self.clock.advance(0.6)
            self.connections[i].protocol.connectionLost(None)
        listener.datagramReceived(b"x", USER)
        listener.stopProtocol()  # and shutdown
        self.connections[2].protocol.connectionLost(None)
        self.assertEqual((listener.cooling, listener.suspects), ({}, {}))
        stream = None
        for i in (3, 4):  # a FIN then the close: one refusal each, not two
            listener.datagramReceived(b"x", ("127.0.0.9", 1))
            stream = self.connections[i].protocol
            stream.readConnectionLost()
            stream.connectionLost(None)
            if i == 3:
                self.assertEqual(listener.cooling, {}, "one refusal only makes a suspect")
        self.assertIn(("127.0.0.9", 1), listener.cooling)

    def test_sessions_waiting_for_the_pool_are_capped(self):
        listener = self.listener(Limits(max_sessions=1000, max_conns=1000))
        for port in range(udptunnel.MAX_WAITING_SESSIONS + 5):
            listener.datagramReceived(b"x", ("127.0.0.9", 1000 + port))
        self.assertEqual(len(listener.sessions), udptunnel.MAX_WAITING_SESSIONS)
        self.assertEqual(self.stats.udp_refused, 5)
        self.idle(2)  # two sessions attached: room for two more
        listener.datagramReceived(b"x", ("127.0.0.9", 1))
        listener.datagramReceived(b"x", ("127.0.0.9", 2))
        self.assertEqual(len(listener.sessions), udptunnel.MAX_WAITING_SESSIONS + 2)

    def test_after_close_nothing_is_processed(self):
        self.idle()
        listener = self.listener()
        listener.datagramReceived(b"x", USER)
        stream = self.connections[0].protocol
        stream.session.close()
        stream.dataReceived(frame(b"late reply"))
        self.assertEqual(listener.transport.written, [])
        self.assertIsNone(self.connections[0].transport.producer, "unregistered before closing")

    def test_stop_closes_every_session(self):
        self.idle(2)
        listener = self.listener()
        listener.datagramReceived(b"x", USER)
        listener.datagramReceived(b"x", ("127.0.0.9", 1))
        listener.stopProtocol()
        self.assertEqual(len(listener.sessions), 0)
        self.assertTrue(all(c.transport.disconnecting for c in self.connections))


class EgressTests(unittest.TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.stats = ListenerStats()

    def egress(self, limits=None, targets=(("127.0.0.1", 53),), **kwargs):
        return UDPEgress(self.reactor, "target", list(targets), limits or Limits(udp_idle=30.0),
                         self.stats, kwargs.pop("udp_buffer", 65535), **kwargs)

    def start(self, egress, addresses=((("192.0.2.7", 4000), ("127.0.0.1", 8053)))):
        stream = egress.open(addresses)
        transport = RelayTransport()
        stream.makeConnection(transport)
        return stream, transport

    def test_datagrams_go_to_the_target_and_replies_come_back_framed(self):
        egress = self.egress()
        stream, transport = self.start(egress)
        (port,) = self.reactor.ports
        self.assertEqual(port.connected_to, ("127.0.0.1", 53))
        stream.dataReceived(frame(b"q1") + frame(b"q2"))
        self.assertEqual(port.written, [(b"q1", None), (b"q2", None)])
        port.protocol.datagramReceived(b"reply", ("127.0.0.1", 53))
        self.assertEqual(DatagramDecoder().feed(transport.value()), [b"reply"])
        self.assertIs(transport.producer, stream)
        self.assertEqual((self.stats.udp_datagrams_in, self.stats.udp_datagrams_out), (2, 1))

    def test_proxy_v2_header_in_front_of_every_datagram(self):
        egress = self.egress(Limits(proxy="v2"))
        stream, _ = self.start(egress)
        stream.dataReceived(frame(b"one") + frame(b"two"))
        (port,) = self.reactor.ports
        for (datagram, _), payload in zip(port.written, (b"one", b"two")):
            header, size = parse(datagram)
            self.assertEqual((header.source, header.destination), (("192.0.2.7", 4000), ("127.0.0.1", 8053)))
            self.assertEqual(datagram[size:], payload)

    def test_disabled_refuses(self):
        self.assertIsNone(self.egress(enabled=False).open(None))

    def test_slot_counts_tcp_connections(self):
        class TCP:
            relays = {object()}
        tcp = TCP()
        egress = self.egress(Limits(max_conns=2), tcp_factory=tcp)
        self.assertIsNotNone(egress.open(None))
        self.assertIsNone(egress.open(None))
        self.assertEqual(self.stats.udp_refused, 1)

    def test_refused_target_cools_down_and_idle_session_closes(self):
        egress = self.egress(targets=(("127.0.0.1", 53), ("127.0.0.2", 53)))
        stream, transport = self.start(egress)
        first = self.reactor.ports[0]
        first.protocol.connectionRefused()
        _, _ = self.start(egress)
        self.assertEqual(self.reactor.ports[1].connected_to, ("127.0.0.2", 53))
        _, _ = self.start(egress)  # round robin, but the refused target waits its cool-down
        self.assertEqual(self.reactor.ports[2].connected_to, ("127.0.0.2", 53))
        self.reactor.advance(31)
        self.assertTrue(first.stopped and transport.disconnecting)
        self.assertEqual(len(egress.sessions), 0)

    def test_socket_closed_by_twisted_ends_the_session(self):
        """Twisted closes a connected UDP socket on an error-only event (ICMP
        port unreachable, nothing to read) without connectionRefused: the
        session ends (its stream closes, a refusal and a drop are counted)
        and nothing more is written to the gone socket."""
        egress = self.egress()
        stream, transport = self.start(egress)
        (port,) = self.reactor.ports
        port.protocol.stopProtocol()  # what udp.Port.connectionLost calls
        self.assertTrue(transport.disconnecting)
        self.assertEqual((len(egress.sessions), self.stats.udp_drops), (0, 1))
        port.write = lambda *args: self.fail("written after its socket was gone")
        stream.dataReceived(frame(b"late"))

    def test_oversized_from_the_tunnel_dropped(self):
        egress = self.egress(udp_buffer=100)
        stream, _ = self.start(egress)
        stream.dataReceived(frame(b"x" * 101) + frame(b"ok"))
        self.assertEqual(self.reactor.ports[0].written, [(b"ok", None)])
        self.assertEqual(self.stats.udp_drops, 1)

    def test_nothing_after_close_and_accounting_stays_put(self):
        self.patch(udpegress, "resolve_udp", lambda reactor, host, port: Deferred())
        egress = self.egress(targets=(("name.invalid", 53),))
        stream, transport = self.start(egress)  # the name is being resolved: datagrams wait
        stream.dataReceived(frame(b"a" * 1000))
        self.assertEqual(egress.pending_bytes, 1000)
        stream.session.close()
        self.assertEqual((egress.pending_bytes, self.stats.udp_drops), (0, 1))
        stream.dataReceived(frame(b"b" * 1000))  # TLS may deliver after a close
        stream.session.from_tunnel(b"c" * 1000)
        self.assertEqual(egress.pending_bytes, 0)
        self.assertIsNone(transport.producer)

    def test_rate_limited_datagrams_count_once(self):
        limiter = RateLimiter(self.reactor, 1000)  # burst 65536 bytes
        egress = self.egress(Limits(limiter=limiter))
        stream, _ = self.start(egress)
        stream.dataReceived(frame(b"x" * 60000) + frame(b"y" * 60000))
        self.assertEqual((self.stats.udp_drops, limiter.dropped_total), (1, 1))
        self.reactor.ports[0].protocol.datagramReceived(b"z" * 60000, None)
        self.assertEqual((self.stats.udp_drops, limiter.dropped_total), (2, 2))

    def test_refused_write_is_not_counted_sent(self):
        egress = self.egress()
        stream, _ = self.start(egress)
        port = self.reactor.ports[0]
        port.write = lambda datagram, addr=None: port.protocol.connectionRefused()
        stream.dataReceived(frame(b"x"))
        self.assertEqual((self.stats.udp_drops, self.stats.udp_datagrams_in), (1, 0))

    def test_send_errors_are_drops(self):
        egress = self.egress()
        stream, _ = self.start(egress)

        def refuse(datagram, addr=None):
            raise OSError(105, "No buffer space available")
        self.reactor.ports[0].write = refuse
        stream.dataReceived(frame(b"x"))
        self.assertEqual(self.stats.udp_drops, 1)


class RealTransportTests(unittest.TestCase):
    """Closing a stream on real connections: TLS never closes, and TCP does
    not while paused, if the stream stays registered as producer."""

    def connect(self, use_tls):
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientFactory, Factory, Protocol
        from twisted.internet.ssl import CertificateOptions

        from tunnelpass.carriers import tls as tlsmod
        from tunnelpass.carriers.tlshalf import HalfCloseTLSFactory

        class Session:
            closed = False

            def stream_ready(self, stream):
                self.stream = stream

            def stream_ended(self, stream):
                self.close()

            def from_tunnel(self, datagram):
                self.received = datagram

            def close(self):
                if not self.closed:
                    self.closed = True
                    self.stream.close()
                    self.ended.callback(None)

        session = Session()
        session.ended = Deferred()
        peer_lost = Deferred()

        class Peer(Protocol):
            def connectionMade(self):
                peer_made.callback(self)

            def connectionLost(self, reason=None):
                peer_lost.callback(None)

        peer_made = Deferred()
        server = Factory.forProtocol(lambda: udptunnel.DatagramStream(session))
        client = ClientFactory.forProtocol(Peer)
        if use_tls:
            key, cert = tlsmod.self_signed()
            server = HalfCloseTLSFactory(tlsmod.server_options(key, [cert]), False, server)
            client = HalfCloseTLSFactory(CertificateOptions(), True, client)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(connector.disconnect)
        return session, peer_made, peer_lost

    async def closes(self, use_tls, paused):
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        session, peer_made, peer_lost = self.connect(use_tls)
        peer = await peer_made
        while not hasattr(session, "stream"):
            await deferLater(reactor, 0.01)
        if use_tls:
            session.stream.send(b"hello")  # through the TLS handshake
            await deferLater(reactor, 0.2)
        if paused:
            peer.transport.pauseProducing()
            while not session.stream.paused:
                session.stream.send(b"x" * 60000)
                await deferLater(reactor, 0)
        session.close()
        if paused:
            await deferLater(reactor, 0.1)
            peer.transport.resumeProducing()
        await peer_lost.addTimeout(5, reactor)

    def test_tcp_paused(self):
        return Deferred.fromCoroutine(self.closes(False, True))

    def test_tls(self):
        return Deferred.fromCoroutine(self.closes(True, False))

    def test_tls_peer_closes(self):
        async def run():
            from twisted.internet import reactor

            session, peer_made, peer_lost = self.connect(True)
            peer = await peer_made
            peer.transport.write(b"\x00\x01x")
            await deferLater_until(lambda: hasattr(session, "stream"))
            peer.transport.loseConnection()
            await session.ended.addTimeout(5, reactor)
            await peer_lost.addTimeout(5, reactor)
        return Deferred.fromCoroutine(run())


async def deferLater_until(predicate):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    while not predicate():
        await deferLater(reactor, 0.01)


class ListenTests(unittest.TestCase):
    def test_a_name_binds_the_tcp_listeners_address_or_is_looked_up(self):
        from twisted.internet import reactor
        from twisted.internet.protocol import DatagramProtocol, ServerFactory

        tcp = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        udp = udptunnel.listen_udp(reactor, "localhost", 0, DatagramProtocol(), beside=tcp)
        self.addCleanup(udp.stopListening)
        self.assertEqual(udp.getHost().host, "127.0.0.1")
        alone = udptunnel.listen_udp(reactor, "localhost", 0, DatagramProtocol())
        self.addCleanup(alone.stopListening)
        self.assertIn(alone.getHost().host, ("127.0.0.1", "::1"))
        from twisted.internet.error import CannotListenError
        self.assertRaises(CannotListenError, udptunnel.listen_udp, reactor, "name.invalid", 0, DatagramProtocol())
