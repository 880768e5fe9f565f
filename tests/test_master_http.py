# -*- test-case-name: tests.test_master_http -*-
"""The master API's guarded HTTP connections: phase deadlines on an
injected clock, the body cap while reading, connection caps, Host names."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tunnelpass.master import httpguard


class Echo(Resource):
    """Answers with the body's length; ``/hold`` answers never."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []
        self.held = []

    def render(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        body = request.content.read()
        self.bodies.append(body)
        return b"%d" % len(body)


def addr(host="127.0.0.1", port=40000):
    return IPv4Address("TCP", host, port)


class GuardTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.resource = Echo()
        self.site = httpguard.GuardedSite(self.resource, self.clock)

    def connect(self, source="127.0.0.1"):
        channel = self.site.buildProtocol(addr(source))
        transport = StringTransport(peerAddress=addr(source))
        channel.makeConnection(transport)
        return channel, transport

    def closed(self, transport) -> bool:
        return transport.disconnected or transport.disconnecting


class DeadlineTests(GuardTestCase):
    def test_one_header_byte_per_second_is_cut_at_ten_seconds(self):
        channel, transport = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 100
        for second, byte in enumerate(request[:10]):
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1 if second < 9 else 0.99)
            self.assertFalse(transport.disconnected, second)
        self.clock.advance(0.01)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.resource.bodies, [])

    def test_silent_connection_is_cut_at_ten_seconds(self):
        _, transport = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_body_has_ten_seconds_from_the_headers(self):
        channel, transport = self.connect()
        self.clock.advance(9)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        for _ in range(9):
            channel.dataReceived(b"x")
            self.clock.advance(1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.resource.bodies, [])

    def test_idle_keep_alive_for_sixty_seconds_then_a_new_header_deadline(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(59)
        self.assertFalse(transport.disconnected)
        channel.dataReceived(b"G")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        channel.dataReceived(b"ET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.value().count(b"200 OK"), 2)
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_no_deadline_while_the_application_answers(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(3600)
        self.assertFalse(transport.disconnected)
        self.resource.held[0].write(b"late")
        self.resource.held[0].finish()
        self.assertIn(b"late", transport.value())

    def test_connection_lost_cancels_the_deadline(self):
        channel, transport = self.connect()
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BodyCapTests(GuardTestCase):
    def test_content_length_over_the_cap_is_refused_before_reading(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n"
                             + b"x" * 1000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 Payload Too Large\r\n"))
        self.assertTrue(transport.value().endswith(b'{"error":"Request body too large"}'))
        self.assertIn(b"X-Content-Type-Options: nosniff", transport.value())
        self.assertTrue(transport.disconnecting)
        before = transport.value()
        channel.dataReceived(b"x" * 100000)
        self.assertEqual(transport.value(), before)
        self.assertEqual(self.resource.bodies, [])

    def test_exactly_the_cap_is_accepted(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65536\r\n\r\n"
                             + b"x" * 65536)
        self.assertEqual(self.resource.bodies, [b"x" * 65536])

    def test_chunked_body_is_counted_as_it_arrives(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        request = channel.requests[-1]
        for _ in range(4):
            channel.dataReceived(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
            self.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"1\r\nx\r\n")
        self.assertIn(b"413 Payload Too Large", transport.value())
        self.assertLessEqual(request.content.tell(), 65536)
        channel.dataReceived(b"0\r\n\r\n")
        self.assertEqual(self.resource.bodies, [])

    def test_small_chunked_body_is_delivered(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(self.resource.bodies, [b"abc"])


class ConnectionCapTests(SynchronousTestCase):
    def assertRefused(self, protocol):
        """Over a cap: a protocol that closes its connection at once (not
        None, which a TLS wrapper would wrap and leave open)."""
        self.assertIsInstance(protocol, httpguard._Refused)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)

    def test_total_and_per_source_caps(self):
        site = httpguard.GuardedSite(Echo(), Clock(), max_connections=4, max_per_source=2)
        a1 = site.buildProtocol(addr("127.0.0.1"))
        a2 = site.buildProtocol(addr("127.0.0.1"))
        self.assertRefused(site.buildProtocol(addr("127.0.0.1")))
        b1 = site.buildProtocol(addr("127.0.0.2"))
        site.buildProtocol(addr("127.0.0.3"))
        self.assertRefused(site.buildProtocol(addr("127.0.0.4")))
        for channel in (a1, a2, b1):
            channel.makeConnection(StringTransport())
        a1.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(site.buildProtocol(addr("127.0.0.1")))
        self.assertEqual(site.per_source, {"127.0.0.1": 2, "127.0.0.3": 1, "127.0.0.2": 1})
        b1.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn("127.0.0.2", site.per_source)

    def test_defaults(self):
        site = httpguard.GuardedSite(Echo(), Clock())
        self.assertEqual((site.max_connections, site.max_per_source), (256, 128))
        for i in range(128):
            self.assertIsNotNone(site.buildProtocol(addr("127.0.0.1")))
        self.assertRefused(site.buildProtocol(addr("127.0.0.1")))
        for i in range(128):
            self.assertIsNotNone(site.buildProtocol(addr("127.0.0.2")))
        self.assertRefused(site.buildProtocol(addr("127.0.0.3")))


async def two_clients_over_a_cap_of_one(testcase, wrap=None):
    """A site allowing one connection per source (wrapped by *wrap*, e.g.
    in TLS), listening on loopback, and two clients connected to it:
    (site, first client, second client)."""
    from tests.test_master_api import RawClient
    site = httpguard.GuardedSite(Echo(), Clock(), max_per_source=1)
    port = reactor.listenTCP(0, wrap(site) if wrap else site, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    first, second = RawClient(), RawClient()
    await connectProtocol(endpoint, first)
    await connectProtocol(endpoint, second)
    return site, first, second


class RealSocketCapTests(TestCase):
    async def test_connection_over_the_per_source_cap_is_closed_unanswered(self):
        site, first, second = await two_clients_over_a_cap_of_one(self)
        self.assertEqual(await second.closed, b"")
        self.assertEqual(site.live, 1)
        first.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertIn(b"200 OK", await first.closed)

    async def test_over_the_cap_behind_tls_is_closed_too(self):
        """The master wraps the site in TLS: a connection over the cap is
        closed there as well, with nothing logged as an error."""
        from twisted.logger import globalLogPublisher
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from tunnelpass.carriers import tls as tlsmod

        errors = []

        def observe(event):
            if event.get("log_failure") is not None or event.get("isError"):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        key, certificate = tlsmod.self_signed()
        options = tlsmod.server_options(key, [certificate])
        site, first, second = await two_clients_over_a_cap_of_one(
            self, lambda site: TLSMemoryBIOFactory(options, False, site))
        self.assertEqual(await second.closed, b"")
        self.assertEqual(site.live, 1)
        self.assertEqual(errors, [])
        first.transport.loseConnection()
        await first.closed


class HostTests(SynchronousTestCase):
    def test_loopback_names(self):
        for host in (b"localhost", b"LOCALHOST:80", b"127.0.0.1", b"127.255.0.9:9090",
                     b"[::1]", b"[::1]:9090"):
            self.assertTrue(httpguard.host_is_loopback(host), host)
        for host in (None, b"", b"evil.example", b"127.0.0.1.nip.io", b"localhost.evil",
                     b"::1", b"[::1", b"[::1]x", b"[::1]:", b"localhost:", b"localhost:x",
                     b"localhost:123456", b"10.0.0.1", b"0.0.0.0", b"[::]", b"\xff"):
            self.assertFalse(httpguard.host_is_loopback(host), host)
