"""Tests for tunnelpass.relay.udp on real loopback sockets (UDP needs no handshake,
so these stay fast) plus a fake clock for session expiry."""

import errno

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from tests.helpers import until
from tunnelpass.config.limits import Limits
from tunnelpass.relay import udp
from tunnelpass.relay.udp import UDPForwardProtocol


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Client(DatagramProtocol):
    def __init__(self):
        self.received = []
        self.waiting = None

    def datagramReceived(self, data, addr):
        self.received.append((data, addr))
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(data)

    def next_reply(self):
        self.waiting = Deferred()
        return self.waiting.addTimeout(5, reactor)



class UDPRelayTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.echo_port = self.listen(Echo())
        self.forwarder = self.make_forwarder(Limits(max_sessions=2, udp_idle=30))

    def listen(self, protocol):
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(port.stopListening)
        return port

    def make_forwarder(self, limits, host="127.0.0.1"):
        forwarder = UDPForwardProtocol(
            reactor, "test/udp", host, self.echo_port.getHost().port, limits, clock=self.clock
        )
        self.forwarder_port = self.listen(forwarder)
        return forwarder

    def client(self):
        client = Client()
        self.listen(client)
        return client

    def send(self, client, data):
        client.transport.write(data, ("127.0.0.1", self.forwarder_port.getHost().port))

    async def test_round_trip_and_counters(self):
        client = self.client()
        reply = client.next_reply()
        self.send(client, b"ping")
        self.assertEqual(await reply, b"ping")
        stats = self.forwarder.stats
        self.assertEqual((stats.udp_sessions, stats.udp_datagrams_in, stats.udp_datagrams_out), (1, 1, 1))
        self.assertEqual((stats.bytes_in, stats.bytes_out), (4, 4))
        self.assertEqual(client.received[0][1][1], self.forwarder_port.getHost().port,
                         "replies come from the address the client sent to")

    async def test_large_datagram_whole(self):
        client = self.client()
        payload = bytes(range(256)) * 240  # 61,440 bytes
        reply = client.next_reply()
        self.send(client, payload)
        self.assertEqual(await reply, payload)

    async def test_sessions_per_client_and_replies_routed(self):
        a, b = self.client(), self.client()
        ra, rb = a.next_reply(), b.next_reply()
        self.send(a, b"from a")
        self.send(b, b"from b")
        self.assertEqual((await ra, await rb), (b"from a", b"from b"))
        self.assertEqual(len(self.forwarder.sessions), 2)

    async def test_session_cap_drops_new_clients(self):
        a, b, c = self.client(), self.client(), self.client()
        for client in (a, b):
            reply = client.next_reply()
            self.send(client, b"x")
            await reply
        self.send(c, b"over the cap")
        reply = a.next_reply()
        self.send(a, b"still served")
        self.assertEqual(await reply, b"still served")
        self.assertEqual(c.received, [])
        self.assertEqual(self.forwarder.stats.udp_drops, 1)
        self.assertEqual(len(self.forwarder.sessions), 2)

    async def test_idle_sessions_expire(self):
        client = self.client()
        reply = client.next_reply()
        self.send(client, b"x")
        await reply
        (session,) = self.forwarder.sessions.values()
        self.clock.advance(20)
        session.send(b"keepalive")  # traffic pushes expiry back
        self.clock.advance(20)
        self.assertEqual(len(self.forwarder.sessions), 1)
        self.clock.advance(11)
        self.assertEqual(len(self.forwarder.sessions), 0)
        self.assertEqual(self.forwarder.stats.udp_sessions, 0)
        self.assertEqual(self.forwarder.stats.udp_sessions_total, 1)
        self.assertTrue(session.closed)

    async def test_remote_given_by_name(self):
        self.forwarder.update("localhost", self.echo_port.getHost().port, Limits())
        client = self.client()
        reply = client.next_reply()
        self.send(client, b"resolved")
        self.assertEqual(await reply, b"resolved")

    async def test_send_errors_are_counted_drops(self):
        client = self.client()
        reply = client.next_reply()
        self.send(client, b"x")
        await reply
        (session,) = self.forwarder.sessions.values()

        def fail(*args):
            raise OSError(errno.ENOBUFS, "No buffer space available")

        self.patch(session.transport, "write", fail)
        session.send(b"lost")
        self.patch(self.forwarder.transport, "write", fail)
        session.datagramReceived(b"lost too", ("127.0.0.1", 1))
        self.assertEqual(self.forwarder.stats.udp_drops, 2)

    async def test_remote_port_unreachable_ends_the_session_quietly(self):
        """ICMP port unreachable on a session's connected socket with nothing
        to read: Twisted closes the socket itself (no connectionRefused).
        The session ends there (a refusal counted); the client's next
        datagram opens a new one -- no write on a socket that is gone (an
        unhandled error per datagram, which trial would fail on)."""
        dead = self.listen(DatagramProtocol())
        dead_port = dead.getHost().port
        await dead.stopListening()
        self.forwarder.update("127.0.0.1", dead_port, Limits(max_sessions=2, udp_idle=30))
        client = self.client()
        self.send(client, b"first")
        await until(lambda: self.forwarder.stats.udp_sessions_total == 1 and not self.forwarder.sessions)
        self.assertGreaterEqual(self.forwarder.stats.udp_drops, 1)
        self.send(client, b"second")  # a new session, to a target that may be back
        await until(lambda: self.forwarder.stats.udp_sessions_total == 2 and not self.forwarder.sessions)

    async def test_unusable_remote_closes_the_session(self):
        events = []
        self.forwarder.log = Logger(observer=events.append)
        self.forwarder.update("255.255.255.255", 9, Limits(max_sessions=2))  # connect() -> EACCES
        clients = [self.client() for _ in range(4)]
        for client in clients:
            self.send(client, b"x")
        await until(lambda: self.forwarder.stats.udp_sessions_total == 4)
        self.assertEqual(len(self.forwarder.sessions), 0, "failed sessions free their slot and socket")
        self.assertEqual(self.forwarder.stats.udp_sessions, 0)
        self.assertEqual(self.forwarder.stats.udp_drops, 4)
        self.assertEqual(len([e for e in events if "cannot open a socket" in e["log_format"]]), 1,
                         "the warning is throttled")

    async def test_pending_datagrams_bounded_while_resolving(self):
        lookups = []
        self.patch(udp, "resolve_udp", lambda reactor, host, port: lookups.append(Deferred()) or lookups[-1])
        self.forwarder.update("backend.invalid", 9, Limits(max_sessions=10))
        a, b = self.client(), self.client()
        for _ in range(10):
            self.send(a, b"p" * 60000)
        self.send(b, b"q")
        await until(lambda: len(self.forwarder.sessions) == 2 and self.forwarder.stats.udp_drops == 6)
        self.assertEqual(len(lookups), 1, "sessions created during one lookup share it")
        (session_a,) = [s for s in self.forwarder.sessions.values() if s.pending and len(s.pending) == 4]
        self.assertLessEqual(session_a.pending.size, udp.MAX_PENDING_BYTES)
        self.assertEqual(self.forwarder.pending_bytes, 4 * 60000 + 1)
        reply = b.next_reply()
        lookups[0].callback(("127.0.0.1", self.echo_port.getHost().port))
        self.assertEqual(await reply, b"q")
        self.assertEqual(self.forwarder.pending_bytes, 0)

    async def test_sessions_closed_while_resolving_count_their_datagrams(self):
        self.patch(udp, "resolve_udp", lambda reactor, host, port: Deferred())
        self.forwarder.update("backend.invalid", 9, Limits(max_sessions=10, udp_idle=30))
        client = self.client()
        for _ in range(3):
            self.send(client, b"z")
        await until(lambda: self.forwarder.sessions and self.forwarder.pending_bytes == 3)
        self.clock.advance(31)  # idle expiry while the lookup hangs
        self.assertEqual(len(self.forwarder.sessions), 0)
        self.assertEqual(self.forwarder.stats.udp_drops, 3)
        self.assertEqual(self.forwarder.pending_bytes, 0)

    async def test_listener_wide_pending_cap(self):
        self.patch(udp, "resolve_udp", lambda reactor, host, port: Deferred())
        self.patch(udp, "MAX_LISTENER_PENDING_BYTES", 150_000)
        self.forwarder.update("backend.invalid", 9, Limits(max_sessions=10))
        clients = [self.client() for _ in range(4)]
        for client in clients:
            self.send(client, b"w" * 60000)
        await until(lambda: self.forwarder.stats.udp_sessions_total == 4)
        self.assertEqual(self.forwarder.pending_bytes, 120_000)
        self.assertEqual(self.forwarder.stats.udp_drops, 2)

    def test_stop_closes_sessions(self):
        client = self.client()
        reply = client.next_reply()
        self.send(client, b"x")

        def stop(_):
            return self.forwarder_port.stopListening()

        def check(_):
            self.assertEqual(len(self.forwarder.sessions), 0)

        return reply.addCallback(stop).addCallback(check)
