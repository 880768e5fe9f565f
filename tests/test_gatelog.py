"""Plain bytes at a TLS server: told, counted by reason, and a throttled
warning once a source does not learn."""

import dataclasses

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from tests.test_replacement import authenticate_from
from tests.test_server import KEY, connect, make_server
from tunnelpass.tunnel.gatelog import PlainClients
from tunnelpass.wire.handshake import ClientHandshake


class PlainClientsTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.plain = PlainClients(self.clock, tls_level=1)
        self.plain.log = Logger(observer=self.events.append)

    def warnings(self):
        return [e for e in self.events if e["log_level"] == LogLevel.warn]

    def test_one_attempt_is_a_client_learning(self):
        self.assertFalse(self.plain.plain("192.0.2.1", 40000))
        self.clock.advance(200)
        self.assertFalse(self.plain.plain("192.0.2.1", 40001), "long after: learning again, not repeating")
        self.assertEqual(self.warnings(), [])

    def test_a_source_that_comes_back_plain_is_warned_about(self):
        self.plain.plain("192.0.2.1", 40000)
        self.clock.advance(2)
        self.assertTrue(self.plain.plain("192.0.2.1", 40001))
        [event] = self.warnings()
        self.assertEqual(event["event"], "client_not_tls")
        self.assertEqual(formatEvent(event), "client at 192.0.2.1:40001 is not speaking TLS (the server runs --tls 1; "
                                             "start the client with the token / --tls 1)")

    def test_many_sources_cannot_flood_the_log(self):
        for i in range(2000):
            for port in (1, 2):
                self.plain.plain(f"10.0.{i // 256}.{i % 256}", port)
        self.assertEqual(len(self.warnings()), 1)
        self.assertLessEqual(len(self.plain._seen), 1024)
        self.clock.advance(10)
        self.plain.plain("10.0.0.1", 3)
        self.plain.plain("10.0.0.1", 4)
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn("such connections since the last warning", formatEvent(self.warnings()[-1]))


class ServerTests(unittest.TestCase):
    def test_plain_hello_at_a_tls_server_is_counted_and_warned(self):
        server = make_server(tls=2)
        events = []
        server.plain_clients.log = Logger(observer=events.append)
        for _ in range(2):
            protocol, transport = connect(server)
            protocol.dataReceived(ClientHandshake(KEY.encode(), b"").start())
            self.assertIn(b"requires TLS (level 2)", transport.value())
            protocol.connectionLost(None)
        self.assertEqual(server.failures_by_reason["no_tls"], 2)
        self.assertEqual(server.failures_by_reason["tls"], 0, "distinct from TLS offered to a plain server")
        self.assertEqual(server.guard.pending, 0)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("client at 192.0.2.1:40000 is not speaking TLS (the server runs --tls 2", formatEvent(warning))
        samples = {s.labels.get("reason"): s.value for s in server.metrics() if s.name == "handshake_failures"}
        self.assertEqual(samples["no_tls"], 2)

    def test_a_session_from_the_source_forgets_its_plain_attempt(self):
        server = make_server(tls=1)
        events = []
        server.plain_clients.log = Logger(observer=events.append)
        protocol, transport = connect(server)
        protocol.dataReceived(ClientHandshake(KEY.encode(), b"").start())
        protocol.connectionLost(None)
        tls = server.settings
        server.settings = dataclasses.replace(tls, tls=0)  # (TLS is not what this test is about)
        authenticate_from(server, "192.0.2.1", 40001)  # the client learned the level: a session
        server.settings = tls
        protocol, transport = connect(server)  # another client on that host, learning too
        protocol.dataReceived(ClientHandshake(KEY.encode(), b"").start())
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])

    def test_failed_tls_handshake_counted_as_tls(self):
        from OpenSSL import SSL
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        server = make_server(tls=1)
        server._load_tls()
        events = []
        server.log = Logger(observer=events.append)
        protocol, transport = connect(server)
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        client.set_connect_state()
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        protocol.dataReceived(client.bio_read(65536))  # a real ClientHello
        self.assertTrue(transport.value(), "the server answered with its hello")
        protocol.dataReceived(b"\x16\x03\x03\x00\x05hello")  # then not a valid handshake record
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(server.failures_by_reason["tls"], 1)
        self.assertEqual(server.failures_by_reason["closed"], 0)
        [debug] = [e for e in events if "TLS handshake with" in e.get("log_format", "")]
        self.assertNotIn("<", formatEvent(debug), "the reason as text, never a repr")
