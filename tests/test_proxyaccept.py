"""--accept-proxy: trusted sources only, a valid header first, nothing guessed."""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from tunnelpass.relay.proxyaccept import HEADER_TIMEOUT, ProxyHeaderProtocol, parse_networks, trusted
from tunnelpass.wire.proxyproto import encode_v1, encode_v2
from tunnelpass.relay.relay import InboundProtocol, TCPForwardFactory
from tunnelpass.config.limits import Limits


def make_factory(networks="127.0.0.1/32, 10.0.0.0/8"):
    reactor = MemoryReactorClock()
    limits = Limits(accept_proxy=parse_networks(networks), proxy="v1")
    return TCPForwardFactory(reactor, "t", "192.0.2.10", 80, limits, clock=reactor), reactor


def connect(factory, host):
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 5555),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    protocol.makeConnection(transport)
    return protocol, transport


class NetworkTests(unittest.TestCase):
    def test_parse_networks(self):
        self.assertEqual([str(n) for n in parse_networks("10.0.0.0/8, ::1/128,")], ["10.0.0.0/8", "::1/128"])
        self.assertEqual(parse_networks(""), ())
        for bad in ("10.0.0.1/8", "not-a-net", "10.0.0.0/33", ",".join(["10.0.0.0/8"] * 1025)):
            self.assertRaises(ValueError, parse_networks, bad)

    def test_trusted(self):
        networks = parse_networks("10.0.0.0/8")
        self.assertTrue(trusted("10.1.2.3", networks))
        self.assertTrue(trusted("::ffff:10.1.2.3", networks), "IPv4-mapped on a dual-stack listener")
        self.assertFalse(trusted("11.0.0.1", networks))
        self.assertFalse(trusted("garbage", networks))


class HeaderTests(unittest.TestCase):
    def test_untrusted_source_is_refused(self):
        factory, _ = make_factory()
        protocol, transport = connect(factory, "192.0.2.99")
        self.assertIsInstance(protocol, ProxyHeaderProtocol)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.stats.refused, 1)

    def test_trusted_header_then_relay_with_the_original_client(self):
        for header in (encode_v1(("198.51.100.7", 4242), ("127.0.0.1", 8080)),
                       encode_v2(("198.51.100.7", 4242), ("127.0.0.1", 8080))):
            factory, reactor = make_factory()
            protocol, transport = connect(factory, "10.9.9.9")
            protocol.dataReceived(header[:5])
            self.assertIsNone(protocol.delegate)
            protocol.dataReceived(header[5:] + b"GET /")
            inbound = protocol.delegate
            self.assertIsInstance(inbound, InboundProtocol)
            self.assertEqual(inbound.original, (("198.51.100.7", 4242), ("127.0.0.1", 8080)))
            self.assertEqual(inbound._early, [b"GET /"])
            self.assertEqual(len(reactor.tcpClients), 1, "the remote is dialled once the header is read")
            greeting = reactor.tcpClients[0][2].greeting
            self.assertEqual(greeting, b"PROXY TCP4 198.51.100.7 127.0.0.1 4242 8080\r\n")
            self.assertEqual(reactor.getDelayedCalls(), [])

    def test_trusted_source_without_a_valid_header_is_refused(self):
        for data in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nonsense\r\n", b"\r\n\r\n\x00\r\nQUIX\n"):
            factory, _ = make_factory()
            protocol, transport = connect(factory, "127.0.0.1")
            protocol.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)

    def test_no_header_in_time(self):
        factory, reactor = make_factory()
        protocol, transport = connect(factory, "127.0.0.1")
        protocol.dataReceived(b"PROXY TCP4 ")
        reactor.advance(HEADER_TIMEOUT)
        self.assertTrue(transport.disconnecting)
