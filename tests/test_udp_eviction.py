"""A full UDP session table evicts a quiet session for a new one, on every
UDP listener: the forwarder's, the tunnel's ingress (users' side) and
egress (target's side).  Sans-IO: fake ports, a fake pool connection and
a fake clock (tests.test_udptunnel's)."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tests.test_udptunnel import FakeReactor, FakeUDPPort, PoolConnection
from tunnelpass.tunnel import udptunnel
from tunnelpass.wire.datagrams import DatagramDecoder, frame
from tunnelpass.ops.metrics import listener_samples, tunnel_samples
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.config.limits import Limits
from tunnelpass.relay.sessiontable import ACTIVE_WINDOW, ALL_ACTIVE, REPLY_WAIT
from tunnelpass.ops.stats import ListenerStats, StatsReporter, tunnel_fields
from tunnelpass.relay.udp import UDPForwardProtocol
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.tunnel.udptunnel import UDPIngress

QUIET = REPLY_WAIT + 0.1  # long enough for any session to be evictable


def user(port: int) -> tuple:
    return ("127.0.0.9", port)


class IngressEvictionTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = ListenerStats()
        self.asked = []
        self.pool = IdlePool(self.clock, 1000, self.asked.append, timeout=5.0)
        self.connections = []

    def listener(self, limits, tcp_factory=None):
        listener = UDPIngress("target", self.clock, limits, self.stats, 65535, PoolOpener(lambda: self.pool),
                              tcp_factory=tcp_factory)
        listener.transport = FakeUDPPort()
        return listener

    def idle(self, count=1):
        for _ in range(count):
            connection = PoolConnection()
            self.connections.append(connection)
            self.pool.add(len(self.connections).to_bytes(16, "big"), connection)

    def counters(self):
        s = self.stats
        return {"sessions": s.udp_sessions, "opened": s.udp_sessions_total, "evicted": s.udp_evictions,
                "refused": s.udp_refused, "drops": s.udp_drops}

    def test_full_table_evicts_the_quiet_answered_session_first(self):
        self.idle(8)
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=3, max_conns=100))
        for port in (1, 2, 3):
            listener.datagramReceived(b"q%d" % port, user(port))
        a, b, c = self.connections[:3]
        b.protocol.dataReceived(frame(b"answer"))  # user 2's exchange is over
        self.clock.advance(QUIET)
        listener.datagramReceived(b"again", user(1))  # user 1 is active
        listener.datagramReceived(b"q4", user(4))
        self.assertTrue(b.transport.disconnecting, "the answered, quiet session's connection is closed")
        self.assertIsNone(b.transport.producer, "unregistered before closing (or TLS never closes)")
        self.assertFalse(a.transport.disconnecting or c.transport.disconnecting)
        self.assertEqual(self.connections[3].sent_frames()[1], [b"q4"])
        self.assertEqual(sorted(s.client for s in listener.sessions.values()), [user(1), user(3), user(4)])
        self.assertEqual(self.counters(), {"sessions": 3, "opened": 4, "evicted": 1, "refused": 0, "drops": 0})
        # Our own eviction is no refusal by the far side.
        b.protocol.connectionLost(None)
        self.assertEqual((listener.suspects, listener.cooling), ({}, {}))
        # No answered session is quiet: the quiet one still without a reply goes.
        listener.datagramReceived(b"q5", user(5))
        self.assertTrue(c.transport.disconnecting)
        # Now every session was active within the window: refused.
        listener.datagramReceived(b"q6", user(6))
        self.assertEqual(self.counters(), {"sessions": 3, "opened": 5, "evicted": 2, "refused": 1, "drops": 1})
        self.assertEqual(len(self.connections[5].transport.value()), 0, "no pool connection for a refusal")
        # Once they go quiet, user 6 gets a session.
        self.clock.advance(QUIET)
        listener.datagramReceived(b"q6", user(6))
        self.assertEqual(self.connections[5].sent_frames()[1], [b"q6"])
        self.assertEqual((len(listener.sessions), self.stats.udp_sessions, self.stats.udp_evictions), (3, 3, 3))

    def test_session_evicted_while_waiting_releases_its_waiter_and_pending(self):
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=2, max_conns=100))
        listener.datagramReceived(b"a" * 100, user(1))
        listener.datagramReceived(b"a" * 100, user(1))
        listener.datagramReceived(b"b" * 10, user(2))
        self.assertEqual((len(self.pool.waiters), listener.pending_bytes, len(listener.unattached)), (2, 210, 2))
        self.clock.advance(QUIET)
        listener.datagramReceived(b"c" * 5, user(3))  # evicts user 1 (quiet longest)
        self.assertEqual(len(self.pool.waiters), 2, "user 1's wait for the pool was cancelled")
        self.assertEqual((listener.pending_bytes, len(listener.unattached)), (15, 2))
        self.assertEqual(self.counters(), {"sessions": 2, "opened": 3, "evicted": 1, "refused": 0, "drops": 2})
        self.idle(2)  # the pool connections go to users 2 and 3, none to the evicted user 1
        self.assertEqual(self.connections[0].sent_frames()[1], [b"b" * 10])
        self.assertEqual(self.connections[1].sent_frames()[1], [b"c" * 5])
        self.assertEqual((listener.pending_bytes, len(listener.unattached), len(self.pool.idle)), (0, 0, 0))

    def test_sessions_waiting_for_the_pool_stay_capped(self):
        """A new session never evicts its way past MAX_WAITING_SESSIONS: each
        waiting one asks the other side for a pool connection, and UDP
        sources are easy to spoof."""
        waiting = udptunnel.MAX_WAITING_SESSIONS
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=waiting, max_conns=100_000))
        for port in range(waiting):
            listener.datagramReceived(b"x", user(1000 + port))
        self.clock.advance(QUIET)  # every one of them is evictable
        for port in range(10):
            listener.datagramReceived(b"x", user(port))
        self.assertEqual((len(listener.unattached), len(self.pool.waiters), len(self.asked)),
                         (waiting, waiting, waiting))
        self.assertEqual(self.counters(), {"sessions": waiting, "opened": waiting, "evicted": 0, "refused": 10,
                                           "drops": 10})

    def test_slot_full_of_tcp_and_udp_evicts_a_udp_session(self):
        class TCP:
            relays = {object(), object()}
        self.idle(3)
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=10, max_conns=3), tcp_factory=TCP())
        listener.datagramReceived(b"x", user(1))
        listener.datagramReceived(b"x", user(2))  # --slot 3: two TCP connections and user 1
        self.assertEqual(self.counters()["refused"], 1)
        self.clock.advance(QUIET)
        listener.datagramReceived(b"x", user(2))
        self.assertTrue(self.connections[0].transport.disconnecting)
        self.assertEqual([s.client for s in listener.sessions.values()], [user(2)])
        self.assertEqual(self.counters(), {"sessions": 1, "opened": 2, "evicted": 1, "refused": 1, "drops": 1})

    def test_no_eviction_when_tcp_alone_fills_the_slot(self):
        class TCP:
            relays = set()
        tcp = TCP()
        self.idle(2)
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=10, max_conns=3), tcp_factory=tcp)
        listener.datagramReceived(b"x", user(1))
        tcp.relays = {object(), object(), object()}  # (a --slot reached by TCP while UDP was quiet)
        self.clock.advance(QUIET)
        listener.datagramReceived(b"x", user(2))
        self.assertFalse(self.connections[0].transport.disconnecting, "evicting it would not make room")
        self.assertEqual(self.counters(), {"sessions": 1, "opened": 1, "evicted": 0, "refused": 1, "drops": 1})

    def test_refusal_is_logged_as_all_active(self):
        self.idle(2)
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=1, max_conns=100))
        listener.datagramReceived(b"x", user(1))
        with capturedLogs() as events:
            listener.datagramReceived(b"x", user(2))
        (event,) = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn(f"max-sessions 1 reached and {ALL_ACTIVE}, refused 1 UDP session(s)", formatEvent(event))

    def test_a_session_awaiting_its_reply_is_refused_for_not_evicted(self):
        """Quiet for ACTIVE_WINDOW but still without its reply: the new
        session is refused (the reply may be on its way); after REPLY_WAIT
        it is evicted."""
        self.idle(3)
        listener = self.listener(Limits(udp_idle=60.0, max_sessions=1, max_conns=100))
        listener.datagramReceived(b"query", user(1))
        self.clock.advance(ACTIVE_WINDOW + 0.1)
        listener.datagramReceived(b"x", user(2))
        self.assertFalse(self.connections[0].transport.disconnecting)
        self.assertEqual(self.counters(), {"sessions": 1, "opened": 1, "evicted": 0, "refused": 1, "drops": 1})
        self.connections[0].protocol.dataReceived(frame(b"late answer"))
        self.assertEqual(listener.transport.written, [(b"late answer", user(1))])
        self.clock.advance(ACTIVE_WINDOW)  # answered and quiet now
        listener.datagramReceived(b"x", user(2))
        self.assertTrue(self.connections[0].transport.disconnecting)
        self.clock.advance(REPLY_WAIT)  # user 2 never had a reply: evictable after REPLY_WAIT
        listener.datagramReceived(b"x", user(3))
        self.assertTrue(self.connections[1].transport.disconnecting)
        self.assertEqual(self.counters(), {"sessions": 1, "opened": 3, "evicted": 2, "refused": 1, "drops": 1})


class EgressEvictionTests(unittest.TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.stats = ListenerStats()
        self.egress = UDPEgress(self.reactor, "target", [("127.0.0.1", 53)],
                                Limits(udp_idle=60.0, max_sessions=2, max_conns=100), self.stats, 65535)

    def open(self):
        stream = self.egress.open(None)
        if stream is None:
            return None, None
        transport = RelayTransport()
        stream.makeConnection(transport)
        return stream, transport

    def test_full_table_evicts_quiet_sessions_then_refuses(self):
        (first, first_transport), (second, second_transport) = self.open(), self.open()
        first_port, second_port = self.reactor.ports
        first.dataReceived(frame(b"query"))
        first_port.protocol.datagramReceived(b"answer", ("127.0.0.1", 53))
        self.assertEqual(DatagramDecoder().feed(first_transport.value()), [b"answer"])
        self.reactor.advance(0.1)
        second.dataReceived(frame(b"query"))  # more recent than the answer, but never answered
        self.reactor.advance(QUIET)
        third, _ = self.open()
        self.assertIsNotNone(third)
        self.assertTrue(first_port.stopped and first_transport.disconnecting, "socket and stream closed")
        self.assertIsNone(first_transport.producer)
        self.assertFalse(second_port.stopped)
        fourth, _ = self.open()  # the unanswered quiet one goes next
        self.assertIsNotNone(fourth)
        self.assertTrue(second_port.stopped and second_transport.disconnecting)
        self.assertEqual(self.open(), (None, None), "every session active: refused")
        s = self.stats
        self.assertEqual((s.udp_sessions, s.udp_sessions_total, s.udp_evictions, s.udp_refused),
                         (2, 4, 2, 1))
        self.assertEqual(len(self.egress.sessions), 2)


class ForwarderEvictionTests(unittest.TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.forwarder = UDPForwardProtocol(self.reactor, "test/udp", "127.0.0.1", 53,
                                            Limits(max_sessions=2, udp_idle=60.0), clock=self.reactor)
        self.forwarder.transport = FakeUDPPort()

    def test_full_table_evicts_quiet_sessions_then_refuses(self):
        forwarder = self.forwarder
        forwarder.datagramReceived(b"q1", user(1))
        forwarder.datagramReceived(b"q2", user(2))
        first, second = self.reactor.ports
        self.assertEqual((first.written, second.written), ([(b"q1", None)], [(b"q2", None)]))
        self.reactor.advance(0.1)
        first.protocol.datagramReceived(b"answer", ("127.0.0.1", 53))
        self.assertEqual(forwarder.transport.written, [(b"answer", user(1))])
        self.reactor.advance(QUIET)
        forwarder.datagramReceived(b"q3", user(3))  # user 1 was answered: it goes first
        self.assertTrue(first.stopped)
        self.assertFalse(second.stopped)
        self.assertEqual(self.reactor.ports[2].written, [(b"q3", None)])
        forwarder.datagramReceived(b"q4", user(4))
        self.assertTrue(second.stopped)
        with capturedLogs() as events:
            forwarder.datagramReceived(b"q5", user(5))  # user 3 and 4 are active
        self.assertEqual(len(self.reactor.ports), 4, "no socket for a refused client")
        self.assertIn("max-sessions 2 reached and " + ALL_ACTIVE, formatEvent(events[0]))
        s = forwarder.stats
        self.assertEqual((s.udp_sessions, s.udp_sessions_total, s.udp_evictions, s.udp_refused, s.udp_drops),
                         (2, 4, 2, 1, 1))
        self.assertEqual(sorted(forwarder.sessions.get(u).client for u in (user(3), user(4))), [user(3), user(4)])

    def test_session_evicted_while_its_name_resolves_drops_what_it_held(self):
        lookups = []

        def resolve():
            lookups.append(Deferred())
            return lookups[-1]
        forwarder = self.forwarder
        forwarder.update("name.invalid", 53, Limits(max_sessions=1, udp_idle=60.0))
        forwarder.resolve = resolve
        forwarder.datagramReceived(b"x" * 10, user(1))
        self.assertEqual(forwarder.pending_bytes, 10)
        self.reactor.advance(QUIET)
        forwarder.datagramReceived(b"y" * 3, user(2))
        self.assertEqual((forwarder.pending_bytes, forwarder.stats.udp_drops, forwarder.stats.udp_evictions),
                         (3, 1, 1))
        lookups[0].callback(("127.0.0.1", 53))  # the evicted session's lookup: nothing opened
        self.assertEqual(self.reactor.ports, [])
        lookups[1].callback(("127.0.0.1", 53))
        self.assertEqual(self.reactor.ports[0].written, [(b"y" * 3, None)])


class EvictionCounterTests(unittest.TestCase):
    """udp_evictions reaches the tunnel's health event, the forwarder's
    stats line and /metrics."""

    def test_counted_everywhere(self):
        from types import SimpleNamespace

        udp = ListenerStats()
        udp.udp_evictions = 7
        self.assertEqual(tunnel_fields(ListenerStats(), udp)["udp_evictions"], 7)
        for samples in (tunnel_samples(ListenerStats(), udp, "server"), listener_samples(udp, {})):
            (sample,) = [s for s in samples if s.name == "udp_sessions_evicted"]
            self.assertEqual((sample.kind, sample.value), ("counter", 7))
        listener = SimpleNamespace(stats=udp, endpoint=SimpleNamespace(protocol="udp"),
                                   rule=SimpleNamespace(remote="127.0.0.1:53"))
        with capturedLogs() as events:
            StatsReporter().report([listener])
        self.assertIn("udp_evictions=7", formatEvent(events[0]))
