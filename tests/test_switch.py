"""Protocol hand-over (tunnelpass.carriers.switch) and half-close over TLS (tunnelpass.carriers.tlshalf)."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from tunnelpass.carriers import tls
from tunnelpass.carriers.switch import SwitchingProtocol
from tunnelpass.carriers.tlshalf import HalfCloseTLSEndpoint, HalfCloseTLSFactory


class Header(SwitchingProtocol):
    def __init__(self):
        self.header = b""
        self.lost = None

    def header_received(self, data):
        self.header += data

    def header_lost(self, reason):
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self):
        self.events = []

    def connectionMade(self):
        self.events.append("made")

    def dataReceived(self, data):
        self.events.append(data)

    def readConnectionLost(self):
        self.events.append("read-closed")

    def writeConnectionLost(self):
        self.events.append("write-closed")

    def connectionLost(self, reason=None):
        self.events.append("lost")


class SwitchTests(unittest.TestCase):
    def test_header_then_hand_over_with_the_rest(self):
        protocol, transport = Header(), StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"head")
        recorder = Recorder()
        protocol.switch_to(recorder, b"rest")
        protocol.dataReceived(b"more")
        protocol.readConnectionLost()
        protocol.writeConnectionLost()
        protocol.connectionLost(None)
        self.assertEqual(protocol.header, b"head")
        self.assertIs(recorder.transport, transport)
        self.assertEqual(recorder.events, ["made", b"rest", b"more", "read-closed", "write-closed", "lost"])
        self.assertIsNone(protocol.lost, "header_lost is only for connections never handed over")

    def test_eof_in_the_header_phase_closes(self):
        protocol, transport = Header(), StringTransport()
        protocol.makeConnection(transport)
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost("gone")
        self.assertEqual(protocol.lost, "gone")

    def test_bytes_beyond_the_header_come_with_the_connection(self):
        """A protocol that can hold early bytes gets them before
        connectionMade: a relay that joins its remote inside connectionMade
        (and may hand both sockets to splice) relays them first."""
        events = []

        class Holder(Recorder):
            def hold_early(self, data):
                events.append(("held", data, self.transport))

            def connectionMade(self):
                events.append("made")

            def dataReceived(self, data):
                events.append(data)

        protocol, transport = Header(), StringTransport()
        protocol.makeConnection(transport)
        protocol.switch_to(Holder(), b"rest")
        self.assertEqual(events, [("held", b"rest", None), "made"])

    def test_delegate_without_half_close_gets_a_full_close(self):
        protocol, transport = Header(), StringTransport()
        protocol.makeConnection(transport)
        protocol.switch_to(Protocol())
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(Protocol):
    """Reads a request until EOF, then answers and half-closes."""

    def __init__(self):
        self.request = b""

    def dataReceived(self, data):
        self.request += data

    def readConnectionLost(self):
        self.transport.write(b"answer to " + self.request)
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Requester(Protocol):
    def __init__(self):
        self.answer = b""
        self.done = Deferred()

    def handshakeCompleted(self):
        self.transport.write(b"request")
        self.transport.loseWriteConnection()
        self.half_closed = not self.transport.disconnecting  # a real half-close, not a full close

    def dataReceived(self, data):
        self.answer += data

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.done.callback(self.answer)


class TLSHalfCloseTests(unittest.TestCase):
    def test_request_eof_answer_over_tls(self):
        """A server that answers only after EOF works over TLS: each
        direction ends with its own close_notify, the other stays open."""
        key, certificate = tls.self_signed()
        factory = HalfCloseTLSFactory(tls.server_options(key, [certificate]), False,
                                      Factory.forProtocol(AnswerAfterEOF))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = HalfCloseTLSEndpoint(tls.PinnedClientCreator(tls.fingerprint(certificate)),
                                        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        requester = Requester()
        d = endpoint.connect(Factory.forProtocol(lambda: requester))
        d.addCallback(lambda _: requester.done)
        d.addCallback(self.assertEqual, b"answer to request")
        d.addCallback(lambda _: self.assertTrue(requester.half_closed))
        return d


class KeepaliveTests(unittest.TestCase):
    def test_keepalive_on_the_socket_beneath(self):
        import socket

        from tunnelpass.carriers.keepalive import IDLE, enable_keepalive

        class Transport:
            pass

        transport = Transport()
        transport.socket = socket.socket()
        self.addCleanup(transport.socket.close)
        self.assertTrue(enable_keepalive(transport))
        self.assertEqual(transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), IDLE)
        self.assertFalse(enable_keepalive(StringTransport()))
