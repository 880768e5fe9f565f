"""TLS on the socket (tunnelpass.carriers.tlssocket): real sockets on loopback, real TLS."""

from __future__ import annotations

import hashlib
import os
import socket

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from cryptography.hazmat.primitives.serialization import Encoding

from tests.certs import ca_signed
from tunnelpass.carriers import tls
from tunnelpass.carriers.stream import socket_unsent, stream_of
from tunnelpass.carriers.tlssocket import TLSClient, TLSServer, connect_tls, listen_tls


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Peer(Protocol):
    """Records what happens to one end."""

    def __init__(self):
        self.received = bytearray()
        self.chunks = 0
        self.events = []
        self.made = defer.Deferred()
        self.handshake = defer.Deferred()
        self.read_closed = defer.Deferred()
        self.lost = defer.Deferred()
        self.waiting = None  # (count, Deferred)

    def connectionMade(self):
        self.made.callback(self)

    def handshakeCompleted(self):
        self.events.append("handshake")
        self.handshake.callback(self)

    def dataReceived(self, data):
        self.received += data
        self.chunks += 1
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(self)

    def wait_for(self, count):
        d = defer.Deferred()
        if len(self.received) >= count:
            d.callback(self)
        else:
            self.waiting = (count, d)
        return d

    def readConnectionLost(self):
        self.events.append("read_closed")
        self.read_closed.callback(self)

    def writeConnectionLost(self):
        self.events.append("write_closed")

    def connectionLost(self, reason):
        self.events.append("lost")
        self.reason = reason
        self.lost.callback(self)


def _server_context():
    key, certificate = tls.self_signed()
    return tls.server_options(key, [certificate]), certificate


class Pair:
    """One listening TLS port and helpers to dial it."""

    def __init__(self, case, context=None):
        if context is None:
            options, self.certificate = _server_context()
            context = options.getContext()
        self.context = context
        self.servers = []
        self.port = listen_tls(reactor, 0, Factory.forProtocol(self._server), lambda: self.context)
        case.addCleanup(self.port.stopListening)
        self.case = case

    def _server(self):
        peer = Peer()
        self.servers.append(peer)
        return peer

    def dial(self, creator=None):
        creator = creator or tls.PinnedClientCreator(tls.fingerprint(self.certificate))
        client = Peer()
        connector = connect_tls(reactor, "127.0.0.1", self.port.getHost().port,
                                ClientFactory.forProtocol(lambda: client), creator, timeout=5)
        self.case.addCleanup(connector.disconnect)
        return client

    @defer.inlineCallbacks
    def connected(self, creator=None):
        client = self.dial(creator)
        yield client.handshake
        while not self.servers or not stream_of(self.servers[-1].transport).secured:
            yield _turn()
        return client, self.servers[-1]


def _turn(delay=0.01):
    d = defer.Deferred()
    reactor.callLater(delay, d.callback, None)
    return d


class HandshakeAndDataTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_echo_both_ways_and_fingerprints(self):
        pair = Pair(self)
        client, server = yield pair.connected()
        self.assertIsInstance(client.transport, TLSClient)
        self.assertIsInstance(server.transport, TLSServer)
        for end in (client, server):
            stream = stream_of(end.transport)
            self.assertIs(stream, end.transport)
            self.assertTrue(stream.secured)
            self.assertTrue(stream.half_closes)
        # Channel binding: what each side sees is the server's certificate.
        expected = tls.fingerprint(pair.certificate)
        self.assertEqual(client.transport.peer_fingerprint(), expected)
        self.assertEqual(tls.peer_fingerprint(client.transport), expected)
        self.assertEqual(server.transport.local_fingerprint(), expected)
        self.assertEqual(tls.local_fingerprint(server.transport), expected)
        self.assertEqual(client.transport.peer_certificates()[0], pair.certificate)
        self.assertEqual(server.transport.tls_connection().get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(server.transport.tls_connection().get_cipher_name(), "TLS_AES_128_GCM_SHA256")
        client.transport.write(b"ping")
        yield server.wait_for(4)
        server.transport.write(b"pong!")
        yield client.wait_for(5)
        self.assertEqual((bytes(server.received), bytes(client.received)), (b"ping", b"pong!"))
        client.transport.loseConnection()  # close_notify, then the socket closes
        yield server.read_closed  # as TCP's FIN: this side decides when to close
        server.transport.loseConnection()
        ends = yield defer.gatherResults([client.lost, server.lost])
        for reason in (end.reason for end in ends):
            reason.trap(ConnectionDone)

    @defer.inlineCallbacks
    def test_writes_before_the_handshake_wait_for_it(self):
        pair = Pair(self)
        client = pair.dial()
        yield client.made
        self.assertFalse(stream_of(client.transport).secured)
        client.transport.write(b"early")
        yield client.handshake
        while not pair.servers:
            yield _turn()
        yield pair.servers[0].wait_for(5)
        self.assertEqual(bytes(pair.servers[0].received), b"early")

    @defer.inlineCallbacks
    def test_large_transfer_both_ways_keeps_every_byte(self):
        pair = Pair(self)
        client, server = yield pair.connected()
        size = 32 * 1024 * 1024
        up, down = os.urandom(size), os.urandom(size)
        client.transport.write(up)
        server.transport.write(down)
        yield defer.gatherResults([server.wait_for(size), client.wait_for(size)])
        self.assertEqual(hashlib.sha256(server.received).digest(), hashlib.sha256(up).digest())
        self.assertEqual(hashlib.sha256(client.received).digest(), hashlib.sha256(down).digest())

    @defer.inlineCallbacks
    def test_plain_bytes_stay_plain(self):
        """A first byte that is not a TLS record: plain TCP, no TLS."""
        pair = Pair(self)
        sock = socket.create_connection(("127.0.0.1", pair.port.getHost().port))
        self.addCleanup(sock.close)
        sock.sendall(b"HELLO plain")
        while not pair.servers or len(pair.servers[0].received) < 11:
            yield _turn()
        stream = stream_of(pair.servers[0].transport)
        self.assertIsNone(stream.secured)
        self.assertEqual(stream.peer_fingerprint(), b"")
        self.assertEqual(stream.native_end().kind, "socket")


class NativeEndTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_first_bytes_go_straight_to_the_socket_before_an_engine_takes_it(self):
        """The opener writes OPEN through the native end (OpenSSL on the
        socket BIO) so Twisted's buffer stays empty for the engine."""
        from tunnelpass.carriers.stream import write_now

        pair = Pair(self)
        client, server = yield pair.connected()
        write_now(client.transport, b"OPEN frame")
        self.assertEqual(client.transport.unsent() - socket_unsent(client.transport.socket), 0)
        yield server.wait_for(10)
        self.assertEqual(bytes(server.received), b"OPEN frame")
        self.assertIsNotNone(client.transport.native_end(), "nothing buffered: an engine may still take it")


class HalfCloseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def _half_close(self, first_is_client):
        pair = Pair(self)
        client, server = yield pair.connected()
        first, second = (client, server) if first_is_client else (server, client)
        first.transport.write(b"request")
        first.transport.loseWriteConnection()
        yield second.read_closed
        self.assertEqual(bytes(second.received), b"request")
        self.assertEqual(first.events[-1], "write_closed")
        # Half-closed either way, no relay engine may take the socket: the
        # close_notify it already read or sent would never be seen again.
        self.assertIsNone(first.transport.native_end())
        self.assertIsNone(second.transport.native_end())
        # The other direction still flows after the close_notify.
        second.transport.write(b"answer after EOF")
        yield first.wait_for(16)
        self.assertEqual(bytes(first.received), b"answer after EOF")
        second.transport.loseWriteConnection()
        ends = yield defer.gatherResults([client.lost, server.lost])
        for reason in (end.reason for end in ends):
            reason.trap(ConnectionDone)  # both close_notify alerts crossed: a clean end
        self.assertEqual(first.events[-3:], ["write_closed", "read_closed", "lost"])
        self.assertEqual(second.events[-3:], ["read_closed", "write_closed", "lost"])

    def test_client_half_closes_first(self):
        return self._half_close(True)

    def test_server_half_closes_first(self):
        return self._half_close(False)


class AbnormalEndTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_fin_without_close_notify_is_not_clean(self):
        pair = Pair(self)
        client, server = yield pair.connected()
        client.transport.socket.shutdown(socket.SHUT_WR)  # truncation: TCP FIN, no close_notify
        reason = (yield server.lost).reason
        self.assertIsNone(reason.check(ConnectionDone))
        self.assertIsNotNone(reason.check(ConnectionLost))
        self.assertNotIn("read_closed", server.events)

    @defer.inlineCallbacks
    def test_abort_sends_no_close_notify_and_resets(self):
        pair = Pair(self)
        client, server = yield pair.connected()
        client.transport.write(b"partial")
        yield server.wait_for(7)
        client.transport.abortConnection()
        reason = (yield server.lost).reason
        self.assertIsNone(reason.check(ConnectionDone))
        self.assertNotIn("read_closed", server.events)  # no close_notify arrived
        self.assertEqual(bytes(server.received), b"partial")


@implementer(IPushProducer)
class Flood:
    """Writes to *transport* until it is paused."""

    def __init__(self, transport, chunk=64 * 1024):
        self.transport, self.chunk = transport, b"x" * chunk
        self.paused = self.stopped = False
        self.pauses = 0
        self.written = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        self.fill()

    def stopProducing(self):
        self.stopped = True

    def fill(self):
        while not self.paused and not self.stopped and self.written < 256 * 1024 * 1024:
            self.transport.write(self.chunk)
            self.written += len(self.chunk)


class BackpressureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_slow_reader_pauses_the_writer_and_memory_stays_bounded(self):
        pair = Pair(self)
        client, server = yield pair.connected()
        client.transport.pauseProducing()  # the client reads nothing
        flood = Flood(server.transport)
        server.transport.registerProducer(flood, True)
        flood.fill()
        for _ in range(30):
            yield _turn()
        stream = stream_of(server.transport)
        self.assertTrue(flood.paused)
        self.assertTrue(stream.consumer_paused())
        # Nothing grew beyond the socket buffers and one Twisted buffer's worth.
        self.assertLess(flood.written, 16 * 1024 * 1024)
        self.assertLess(len(server.transport.dataBuffer) + server.transport._tempDataLen,
                        server.transport.bufferSize + 2 * len(flood.chunk))
        before = flood.written
        client.transport.resumeProducing()
        yield client.wait_for(before + 1024 * 1024)
        self.assertGreater(flood.written, before)  # resumed once the reader caught up
        server.transport.unregisterProducer()
        flood.stopped = True


class VerificationTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_pin_mismatch_fails_before_any_application_byte(self):
        pair = Pair(self)
        client = pair.dial(tls.PinnedClientCreator(b"\x01" * 32))
        yield client.made
        client.transport.write(b"secret")
        reason = (yield client.lost).reason
        self.assertIsNotNone(reason.check(SSL.Error))
        self.assertNotIn("handshake", client.events)
        while not pair.servers or "lost" not in pair.servers[0].events:
            yield _turn()
        self.assertEqual(bytes(pair.servers[0].received), b"")
        self.assertIsNotNone(pair.servers[0].reason.check(SSL.Error))  # the gate counts it as "tls"

    @defer.inlineCallbacks
    def _verified(self, hostname, ca_for_client):
        ca, certificate, key = _ca_pair("localhost")
        pair = Pair(self, tls.server_options(key, [certificate]).getContext())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write((ca_for_client or ca).public_bytes(Encoding.PEM))
        client = pair.dial(tls.verified_client_creator(hostname, path))
        yield client.made
        client.transport.write(b"secret")
        reason = (yield client.lost).reason
        return client, pair, reason

    @defer.inlineCallbacks
    def test_tls2_verifies_chain_and_name(self):
        ca, certificate, key = _ca_pair("localhost")
        pair = Pair(self, tls.server_options(key, [certificate]).getContext())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ca.public_bytes(Encoding.PEM))
        client, server = yield pair.connected(tls.verified_client_creator("localhost", path))
        self.assertEqual(client.transport.tls_connection().get_servername(), b"localhost")
        self.assertEqual(server.transport.tls_connection().get_servername(), b"localhost")  # SNI sent

    @defer.inlineCallbacks
    def test_tls2_wrong_hostname_fails_with_the_reason(self):
        client, pair, reason = yield self._verified("other.example", None)
        self.assertIsNotNone(reason.check(VerificationError))
        self.assertNotIn("handshake", client.events)
        self.assertEqual(b"".join(bytes(s.received) for s in pair.servers), b"")

    @defer.inlineCallbacks
    def test_tls2_untrusted_ca_fails_with_the_reason(self):
        other_ca, _, _ = _ca_pair("localhost")
        client, pair, reason = yield self._verified("localhost", other_ca)
        self.assertIsNotNone(reason.check(SSL.Error))
        self.assertIn("certificate verify failed", str(reason.value))
        self.assertEqual(b"".join(bytes(s.received) for s in pair.servers), b"")


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_new_context_applies_to_new_connections_only(self):
        pair = Pair(self)
        old_client, old_server = yield pair.connected()
        options, new_certificate = _server_context()
        pair.context = options.getContext()
        new_client, new_server = yield pair.connected(tls.PinnedClientCreator(tls.fingerprint(new_certificate)))
        self.assertEqual(old_server.transport.local_fingerprint(), tls.fingerprint(pair.certificate))
        self.assertEqual(new_server.transport.local_fingerprint(), tls.fingerprint(new_certificate))
        self.assertEqual(new_client.transport.peer_fingerprint(), tls.fingerprint(new_certificate))
        old_client.transport.write(b"still")  # the old connection lives on with its certificate
        yield old_server.wait_for(5)


def _ca_pair(hostname):
    ca, key, certificate = ca_signed(hostname)
    return ca, certificate, key
