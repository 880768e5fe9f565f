"""Tests for tunnelpass.tunnel.control: control protocols over in-memory connections."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest

from tunnelpass.wire.codec import FrameDecoder, Type, encode
from tunnelpass.tunnel.control import ClientControlProtocol, ServerControlProtocol
from tunnelpass.wire.handshake import ClientHandshake, SessionConfig

KEY = b"control-test-key-9fQ2xL7mZ4pW8vR3"


class Handler:
    def __init__(self):
        self.events = []

    def session_started(self, protocol):
        self.events.append("session")

    def dial_pool(self, count):
        self.events.append(("pool", count))

    def control_lost(self, protocol):
        self.events.append(("lost", protocol.close_reason))


class ControlTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.sessions, self.lost = [], []
        self.handler = Handler()

    def pair(self, client_key=KEY, client_fp=b"", server_fp=b""):
        server = ServerControlProtocol(KEY, server_fp, SessionConfig(heartbeat_ms=1000), self.clock,
                                       self.sessions.append, self.lost.append)
        client = ClientControlProtocol(client_key, lambda transport: client_fp, self.handler, self.clock)
        self.server_transport = iosim.makeFakeServer(server)
        self.client_transport = iosim.makeFakeClient(client)
        self.pump = iosim.connect(server, self.server_transport, client, self.client_transport)
        return server, client

    def test_authenticates_then_signals_flow(self):
        server, client = self.pair()
        self.assertEqual(self.sessions, [server])
        self.assertEqual(self.handler.events, ["session"])
        self.assertEqual(server.session, client.session)
        server.send_pool(7)
        self.pump.flush()
        self.assertEqual(self.handler.events[1:], [("pool", 7)])

    def test_old_servers_tcp_and_flush_signals_are_ignored(self):
        """A server of an earlier release sends TCP(id) before each relay
        (and could send FLUSH): the client checks and ignores them, so the
        session goes on; a malformed TCP is still a protocol violation."""
        server, client = self.pair()
        self.assertFalse(hasattr(server, "send_tcp") or hasattr(server, "send_flush"), "no longer sent")
        server.transport.write(encode(Type.TCP, b"i" * 16) + encode(Type.FLUSH) + encode(Type.POOL, b"\x00\x02"))
        self.pump.flush()
        self.assertEqual(self.handler.events, ["session", ("pool", 2)])
        self.assertIsNone(client.close_reason)
        server.transport.write(encode(Type.TCP, b"short"))
        self.pump.flush()
        self.assertIn("TCP signal must carry a 16-byte id", client.close_reason or "")

    def test_signal_in_the_same_read_as_welcome(self):
        server = ServerControlProtocol(KEY, b"", SessionConfig(), self.clock,
                                       lambda p: p.send_pool(4), self.lost.append)
        client = ClientControlProtocol(KEY, lambda transport: b"", self.handler, self.clock)
        server_t, client_t = iosim.makeFakeServer(server), iosim.makeFakeClient(client)
        iosim.connect(server, server_t, client, client_t)
        self.assertEqual(self.handler.events, ["session", ("pool", 4)])

    def test_refused_connection_gets_no_second_try(self):
        server = ServerControlProtocol(KEY, b"", SessionConfig(), self.clock, self.sessions.append, self.lost.append)
        transport = StringTransport()
        server.makeConnection(transport)
        good = ClientHandshake(KEY, b"")
        server.dataReceived(good.start())
        challenge = FrameDecoder().feed(transport.value())[0]
        bad = ClientHandshake(b"bad", b"")
        bad.start()
        (bad_auth,) = bad.receive(challenge)
        (good_auth,) = good.receive(challenge)
        server.dataReceived(bad_auth)
        server.dataReceived(good_auth)  # e.g. still delivered after loseConnection over TLS
        self.assertEqual(self.sessions, [])

    def test_wrong_key_is_reported_to_the_client(self):
        server, client = self.pair(client_key=b"wrong")
        self.assertEqual(self.sessions, [])
        self.assertTrue(self.client_transport.disconnecting or self.server_transport.disconnecting)
        self.pump.flush()
        self.assertIn("authentication failed", client.close_reason)

    def test_channel_binding_mismatch_fails(self):
        server, client = self.pair(client_fp=b"\x01" * 32, server_fp=b"\x02" * 32)
        self.assertEqual(self.sessions, [])
        self.assertIsNone(client.session)

    def test_heartbeat_measures_rtt(self):
        server, client = self.pair()
        self.clock.advance(1)
        self.pump.flush()
        self.assertIsNotNone(server.rtt)
        self.assertFalse(self.server_transport.disconnecting)

    def test_silent_client_is_dropped_after_three_heartbeats(self):
        server, client = self.pair()
        client.dataReceived = lambda data: None  # the client stops answering
        for _ in range(3):
            self.clock.advance(1)
            self.pump.flush()
        self.assertTrue(self.server_transport.disconnected)
        self.assertIn("silent", server.close_reason)

    def test_silent_server_is_dropped_by_the_client(self):
        server, client = self.pair()
        server.tick = lambda: None  # the server stops pinging
        for _ in range(3):
            self.clock.advance(1)
        self.assertTrue(self.client_transport.disconnecting)
        self.assertIn("silent", client.close_reason)

    def test_handshake_deadline(self):
        server = ServerControlProtocol(KEY, b"", SessionConfig(), self.clock, self.sessions.append, self.lost.append)
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(encode(Type.HELLO, b"\x01\x01")[:3])  # then nothing
        self.clock.advance(5)
        self.assertTrue(transport.disconnected)
        self.assertEqual(server.close_reason, "handshake timed out")

    def test_garbage_before_auth_aborts_only_that_connection(self):
        server = ServerControlProtocol(KEY, b"", SessionConfig(), self.clock, self.sessions.append, self.lost.append)
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.sessions, [])

    def test_signals_before_auth_refused(self):
        server = ServerControlProtocol(KEY, b"", SessionConfig(), self.clock, self.sessions.append, self.lost.append)
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(encode(Type.TCP, b"x" * 16))
        self.assertTrue(transport.disconnected)

    def test_replace_and_shutdown_tell_the_client(self):
        server, client = self.pair()
        server.replaced()
        self.pump.flush()
        self.assertIn("replaced by a newer session", client.close_reason)

    def test_bad_signal_from_server_closes_client(self):
        server, client = self.pair()
        client.dataReceived(encode(Type.POOL, b"\x01"))
        self.assertTrue(self.client_transport.disconnecting)
        self.assertIn("16-bit count", client.close_reason)
