"""tunnelpass.tunnel.dispatch: the one OPEN reader and dispatcher of the side that dials --target."""

from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.poolfakes import MemberStream
from tunnelpass.wire.codec import ProtocolError, Type, encode, encode_open
from tunnelpass.tunnel.dispatch import OpenDispatcher, OpenReader
from tunnelpass.carriers.stream import TCP, UDP, IStreamAcceptor

ID = b"i" * 16
USER = (("198.51.100.7", 4321), ("127.0.0.1", 8080))


class OpenReaderTests(unittest.TestCase):
    def test_open_then_the_users_bytes(self):
        reader = OpenReader(ID)
        self.assertEqual(reader.feed(encode_open(ID, *USER) + b"GET /"), (TCP, USER, b"GET /"))

    def test_open_udp_in_pieces(self):
        reader = OpenReader(ID)
        frame = encode_open(ID, *USER, frame_type=Type.OPEN_UDP)
        self.assertIsNone(reader.feed(frame[:5]))
        self.assertEqual(reader.feed(frame[5:]), (UDP, USER, b""))

    def test_another_connections_id_is_refused(self):
        self.assertRaises(ProtocolError, OpenReader(ID).feed, encode_open(b"j" * 16))

    def test_any_other_frame_is_refused(self):
        self.assertRaises(ProtocolError, OpenReader(ID).feed, encode(Type.HELLO, b"x"))


class Recorder(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class Factory:
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        protocol = Recorder()
        self.built.append(protocol)
        return protocol


class Egress:
    def __init__(self, refuse=False):
        self.refuse, self.opened = refuse, []

    def open(self, addresses):
        self.opened.append(addresses)
        return None if self.refuse else Recorder()


class OpenDispatcherTests(unittest.TestCase):
    def setUp(self):
        self.factory, self.egress = Factory(), Egress()
        self.stream = MemberStream()

    def test_provides_the_interface(self):
        verifyObject(IStreamAcceptor, OpenDispatcher(self.factory, self.egress))

    def test_tcp_dials_the_target_with_the_users_addresses(self):
        dispatcher = OpenDispatcher(self.factory, self.egress)
        self.assertTrue(dispatcher.stream_accepted(TCP, USER, self.stream, b"first"))
        (protocol,) = self.factory.built
        self.assertEqual(protocol.original, USER)  # for --proxy-protocol
        self.assertIs(self.stream.protocol, protocol)
        self.assertEqual(protocol.received, b"first")
        self.assertEqual(self.egress.opened, [])

    def test_udp_opens_an_egress_session(self):
        dispatcher = OpenDispatcher(self.factory, self.egress)
        self.assertTrue(dispatcher.stream_accepted(UDP, USER, self.stream, b""))
        self.assertEqual(self.egress.opened, [USER])
        self.assertIsInstance(self.stream.protocol, Recorder)
        self.assertEqual(self.factory.built, [])

    def test_udp_refused_by_the_egress_aborts_that_stream(self):
        dispatcher = OpenDispatcher(self.factory, Egress(refuse=True))
        self.assertFalse(dispatcher.stream_accepted(UDP, USER, self.stream, b""))
        self.assertTrue(self.stream.disconnected)
        self.assertIsNone(self.stream.protocol)

    def test_no_tcp_aborts_a_tcp_stream(self):
        dispatcher = OpenDispatcher(self.factory, self.egress, tcp=False)
        self.assertFalse(dispatcher.stream_accepted(TCP, USER, self.stream, b"x"))
        self.assertTrue(self.stream.disconnected)
        self.assertEqual(self.factory.built, [])

    def test_unknown_kind_aborts_the_stream(self):
        dispatcher = OpenDispatcher(self.factory, self.egress)
        self.assertFalse(dispatcher.stream_accepted("sctp", USER, self.stream, b""))
        self.assertTrue(self.stream.disconnected)
