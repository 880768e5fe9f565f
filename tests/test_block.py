"""--block: the first-bytes classifier (sans-IO) and the gate at accept."""

import os
import ssl

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tunnelpass.relay.block import FIRST_BYTES_WAIT, MAX_PEEK, classify, parse_block
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits

SOCKS4 = b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"
SOCKS5 = b"\x05\x02\x00\x02"
HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
H2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def client_hello() -> bytes:
    """A real ClientHello, as Python's ssl module writes it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="example.com")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class ParseTests(unittest.TestCase):
    def test_digits(self):
        self.assertEqual(parse_block("321"), "123")
        self.assertEqual(parse_block("2212"), "12")
        self.assertEqual(parse_block("0"), "")
        for bad in ("", "4", "1,2", "http", "1 2"):
            self.assertRaises(ValueError, parse_block, bad)


class ClassifyTests(unittest.TestCase):
    def test_each_kind_is_refused_only_when_asked(self):
        hello = client_hello()
        for data, kind, digit in ((SOCKS4, "socks", "1"), (SOCKS5, "socks", "1"), (HTTP, "http", "2"),
                                  (H2, "http", "2"), (hello, "tls", "3")):
            self.assertEqual(classify(data, "123"), kind, data)
            self.assertEqual(classify(data, digit), kind, data)
            others = "".join(d for d in "123" if d != digit)
            self.assertEqual(classify(data, others), "", f"{data!r} with block={others}")

    def test_every_method(self):
        for method in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH", "TRACE"):
            self.assertEqual(classify(f"{method} x HTTP/1.1\r\n".encode(), "2"), "http", method)

    def test_one_byte_at_a_time(self):
        """Undecided (None) until the prefix tells, then decided; never more
        than MAX_PEEK bytes needed."""
        for data, kind in ((b"OPTIONS * HTTP/1.1\r\n", "http"), (SOCKS5, "socks"), (client_hello(), "tls")):
            verdicts = [classify(data[:n], "123") for n in range(0, MAX_PEEK + 1)]
            decided = next(n for n, v in enumerate(verdicts) if v is not None)
            self.assertTrue(all(v is None for v in verdicts[:decided]), data)
            self.assertTrue(all(v == kind for v in verdicts[decided:]), data)

    def test_passes(self):
        for data in (b"SSH-2.0-OpenSSH_9.6\r\n", b"get / http/1.1", b"GETX / HTTP", b"\x00\x01\x02binary",
                     b"\x16\x03\x01\x00\x00\x01", b"\x16\x03\x09", b"\x05\x00", b"\x05\x01\xff",
                     b"\x04\x05", b"EHLO x\r\n", b"\xff" * 100):
            self.assertEqual(classify(data, "123"), "", data)

    def test_empty_and_end_of_stream(self):
        self.assertIsNone(classify(b"", "2"))
        self.assertEqual(classify(b"", "2", final=True), "")
        self.assertIsNone(classify(b"GE", "2"))
        self.assertEqual(classify(b"GE", "2", final=True), "", "an unfinished method is no method")
        self.assertEqual(classify(b"GET ", "2", final=True), "http")
        self.assertEqual(classify(b"GET ", ""), "", "nothing blocked")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=32), st.sampled_from(["1", "2", "3", "12", "123"]))
    def test_hostile_input_decides_within_the_peek_and_never_changes_its_mind(self, data, digits):
        verdict = classify(data, digits)
        if len(data) >= MAX_PEEK:
            self.assertIsNotNone(verdict)
        for n in range(len(data) + 1):
            earlier = classify(data[:n], digits)
            if earlier is not None:
                self.assertEqual(classify(data, digits), earlier)
                break


class GateTests(unittest.TestCase):
    """The gate on a relay's accepted side (MemoryReactorClock, StringTransport)."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = TCPForwardFactory(self.reactor, "t", "10.0.0.1", 1, Limits(block="23"), clock=self.reactor)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def accept(self):
        inbound = self.factory.buildProtocol(None)
        inbound.makeConnection(RelayTransport())
        return inbound

    def answer(self, index=0):
        """The remote accepts the dial *index*: its transport."""
        outbound = self.reactor.tcpClients[index][2].buildProtocol(None)
        transport = RelayTransport()
        outbound.makeConnection(transport)
        return outbound, transport

    def blocked_events(self):
        return [e for e in self.events if e.get("event") == "blocked"]

    def test_http_refused_before_anything_is_dialled(self):
        inbound = self.accept()
        self.assertEqual(self.reactor.tcpClients, [], "nothing dialled while the first bytes are awaited")
        for byte in HTTP[:4]:
            inbound.dataReceived(bytes([byte]))
        self.assertTrue(inbound.transport.disconnecting)
        self.assertEqual(self.factory.stats.blocked, 1)
        self.reactor.advance(FIRST_BYTES_WAIT * 2)
        self.assertEqual(self.reactor.tcpClients, [], "a refused user never reaches the remote")
        [event] = self.blocked_events()
        self.assertEqual((event["protocol"], event["count"]), ("http", 1))

    def test_debug_trace_says_blocked(self):
        from tunnelpass.ops import connlog

        self.patch(connlog.TRACING, "enabled", True)
        inbound = self.accept()
        inbound.dataReceived(HTTP)
        inbound.connectionLost(None)
        [close] = [e for e in self.events if e.get("event") == "conn_close"]
        self.assertEqual((close["reason"], close["detail"]), ("blocked", "http"))

    def test_refusals_are_logged_throttled_and_counted(self):
        for _ in range(3):
            self.accept().dataReceived(client_hello())
        self.assertEqual(self.factory.stats.blocked, 3)
        self.assertEqual(len(self.blocked_events()), 1)
        self.reactor.advance(11)
        self.accept().dataReceived(HTTP)
        self.assertEqual([e["count"] for e in self.blocked_events()], [1, 3])

    def test_passing_bytes_go_with_the_connection(self):
        inbound = self.accept()
        inbound.dataReceived(b"\x00\x01raw")
        self.assertEqual(len(self.reactor.tcpClients), 1, "dialled as soon as the bytes pass")
        self.assertTrue(inbound.transport.producerState == "paused")
        _, remote = self.answer()
        self.assertEqual(remote.value(), b"\x00\x01raw")
        inbound.dataReceived(b"GET / more")
        self.assertEqual(remote.value(), b"\x00\x01rawGET / more", "only the first bytes are judged")
        self.assertEqual(self.factory.stats.blocked, 0)

    def test_server_speaks_first(self):
        """A silent user is dialled after the wait; the remote's banner
        reaches it; its first bytes are then judged before they go on."""
        inbound = self.accept()
        self.reactor.advance(FIRST_BYTES_WAIT)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        outbound, remote = self.answer()
        outbound.dataReceived(b"220 smtp ready\r\n")
        self.assertEqual(inbound.transport.value(), b"220 smtp ready\r\n")
        inbound.dataReceived(b"GE")
        self.assertEqual(remote.value(), b"", "held while it could still be a blocked start")
        inbound.dataReceived(b"TX\r\n")
        self.assertEqual(remote.value(), b"GETX\r\n")
        inbound.dataReceived(b"GET / \r\n")
        self.assertEqual(remote.value(), b"GETX\r\nGET / \r\n", "judged once")

    def test_waiting_does_not_get_round_the_check(self):
        inbound = self.accept()
        self.reactor.advance(FIRST_BYTES_WAIT + 5)
        outbound, remote = self.answer()
        inbound.dataReceived(b"POST /x HTTP/1.1\r\n")
        self.assertEqual(remote.value(), b"")
        self.assertTrue(inbound.transport.disconnecting)
        self.assertEqual(self.factory.stats.blocked, 1)
        inbound.connectionLost(None)
        self.assertTrue(remote.disconnecting, "the remote leg, which carried nothing, is closed too")

    def test_end_of_stream_decides(self):
        inbound = self.accept()
        self.reactor.advance(FIRST_BYTES_WAIT)
        _, remote = self.answer()
        inbound.dataReceived(b"GE")
        inbound.readConnectionLost()
        self.assertEqual(remote.value(), b"GE")
        self.assertTrue(remote.write_closed, "the FIN follows")
        self.assertEqual(self.factory.stats.blocked, 0)

    def test_hang_up_while_waiting(self):
        inbound = self.accept()
        inbound.connectionLost(None)
        self.reactor.advance(FIRST_BYTES_WAIT * 2)
        self.assertEqual(self.reactor.tcpClients, [], "the wait ends with the connection")
        self.assertEqual(self.factory.stats.active, 0)

    def test_no_block_dials_at_once(self):
        self.factory.update("10.0.0.1", 1, Limits())
        self.accept()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_random_binary_passes(self):
        data = os.urandom(4096)
        if classify(data, "23"):
            data = b"\x00" + data
        inbound = self.accept()
        inbound.dataReceived(data)
        _, remote = self.answer()
        self.assertEqual(remote.value(), data)


class WhereTests(unittest.TestCase):
    def test_only_where_users_connect(self):
        """A client judges users only on its own listener (send flow:
        tunnelpass.tunnel.clientpool.SendFlowFactory; local flow: the target factory),
        never the tunnel connections it dials targets for."""
        from tunnelpass.tunnel.client import ClientSettings, TunnelClient

        limits = Limits(block="2")
        for flow, block in (("receive", ""), ("auto", ""), ("local", "2")):
            client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key="k" * 16, flow=flow,
                                                 limits=limits), MemoryReactorClock())
            self.assertEqual(client.target_factory.limits.block, block, flow)
