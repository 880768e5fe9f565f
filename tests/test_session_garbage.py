"""A closed UDP session, and the pool connection that carried it, are freed
by reference counting, not left for the cyclic garbage collector.

Under DNS-style churn every query is a session with its own pool
connection: a few reference cycles per session added up to tens of
thousands of objects for the collector, and its full collections paused
the server and the client for 150-330 ms each in the middle of the e2e
churn test's burst (answers late, sessions all "active", new ones
refused).  These tests run with the collector off, so an object that is
only unreachable through a cycle stays alive and its weak reference with
it.
"""

import gc
import weakref

from twisted.internet.base import BaseConnector
from tests.helpers import RelayTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.test_udptunnel import FakeReactor, FakeUDPPort, PoolConnection, USER
from tunnelpass.tunnel.clientpool import _PoolConnectionFactory
from tunnelpass.wire.datagrams import frame
from tunnelpass.relay.dialsource import Dialer
from tunnelpass.relay.namecache import NameCache
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.config.limits import Limits
from tunnelpass.ops.stats import ListenerStats
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.tunnel.udptunnel import UDPIngress


class CollectorOff(unittest.TestCase):
    def setUp(self):
        gc.collect()  # what earlier tests left
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)


class SessionTests(CollectorOff):
    def test_closed_egress_session_freed(self):
        """The egress (the session is its own table key) after the far side
        closes its pool connection, and after an eviction."""
        reactor = FakeReactor()
        egress = UDPEgress(reactor, "target", [("127.0.0.1", 53)], Limits(udp_idle=30.0), ListenerStats(), 65535)
        for end in ("far side closed", "evicted"):
            stream = egress.open(None)
            stream.makeConnection(RelayTransport())
            stream.dataReceived(frame(b"query"))
            reactor.ports[0].protocol.datagramReceived(b"answer", ("127.0.0.1", 53))
            session = weakref.ref(stream.session)
            if end == "evicted":
                egress.sessions.evict(stream.session)
            stream.connectionLost(None)
            (port,) = reactor.ports
            self.assertTrue(port.stopped)
            # What Twisted does with a stopped port: the protocol's
            # doStop() drops its transport, and the reactor lets go.
            port.protocol.transport = None
            del reactor.ports[:], port
            del stream
            self.assertIsNone(session(), f"{end}: the session is still alive")
        self.assertEqual(len(egress.sessions), 0)

    def test_closed_ingress_session_freed_while_its_connection_lives_on(self):
        """On the server the pool connection's protocols keep each other
        (and so this stream) alive until the collector runs: the stream
        must not keep its session."""
        clock = FakeReactor()
        pool = IdlePool(clock, 16, lambda n: None, timeout=2.0)
        listener = UDPIngress("target", clock, Limits(udp_idle=30.0, max_sessions=1, max_conns=100),
                              ListenerStats(), 65535, PoolOpener(lambda: pool))
        listener.transport = FakeUDPPort()
        connections = [PoolConnection() for _ in range(3)]
        for i, connection in enumerate(connections):
            pool.add(bytes([i]) * 16, connection)
        sessions = []
        for port in (1, 2):  # the second evicts the first (max_sessions 1), once it has been answered and quiet
            listener.datagramReceived(b"query", (USER[0], port))
            stream = connections[port - 1].protocol
            stream.dataReceived(frame(b"answer"))
            sessions.append(weakref.ref(stream.session))
            clock.advance(1)
        connections[0].protocol.connectionLost(None)  # the evicted session's connection ends
        self.assertIsNone(sessions[0](), "an evicted session outlives its close")
        connections[1].protocol.connectionLost(None)  # the far side ends the other
        self.assertIsNone(sessions[1](), "a session ended by the far side outlives its close")
        self.assertEqual(len(listener.sessions), 0)


class PoolConnectionTests(CollectorOff):
    def test_lost_pool_connection_leaves_no_cycle_with_its_connector(self):
        """Twisted's connector and its transport refer to each other; a pool
        connection's factory breaks that once the connection is lost."""

        class Transport:
            def __init__(self, connector):
                self.connector = connector  # as twisted.internet.tcp.Client has it

        class Connector(BaseConnector):
            def _makeTransport(self):
                return Transport(self)

            def getDestination(self):
                return None

        class Client:
            def pool_state_changed(self, old, new):
                pass

        client = Client()
        connector = Connector(_PoolConnectionFactory(client, None, 1, b"\0" * 16), None, FakeReactor())
        connector.connect()
        transport = weakref.ref(connector.transport)
        connector.connectionLost(Failure(ConnectionError("lost")))
        connector = weakref.ref(connector)
        self.assertIsNone(transport())
        self.assertIsNone(connector())


class LiteralTargetTests(unittest.TestCase):
    def test_literal_target_skips_the_lookup_chain_but_keeps_the_source(self):
        """An IP literal target (the usual DNS forwarder) opens its socket
        at once, without a Deferred chain through the dialer, from the
        --dial source, to the normalized address."""

        class CountingDialer(Dialer):
            resolved = 0

            def resolve_udp(self, host, port):
                self.resolved += 1
                return super().resolve_udp(host, port)

        reactor = FakeReactor()
        interfaces = []
        listen = reactor.listenUDP
        reactor.listenUDP = lambda port, protocol, interface="", maxPacketSize=8192: (
            interfaces.append(interface) or listen(port, protocol, interface, maxPacketSize))
        dialer = CountingDialer(reactor, "::1", NameCache(lambda host: None, reactor))
        egress = UDPEgress(reactor, "target", [("0:0::1", 53)],
                           Limits(udp_idle=30.0, dialer=dialer), ListenerStats(), 65535)
        egress.open(None).makeConnection(RelayTransport())
        self.assertEqual(dialer.resolved, 0)
        self.assertEqual(reactor.ports[0].connected_to, ("::1", 53))
        self.assertEqual(interfaces, ["::1"])


class GateTests(CollectorOff):
    def test_closed_tunnel_port_connection_freed(self):
        """A connection to the tunnel port that ends before its first
        frame: the gate and its admission ticket go with the last
        reference; after a first frame, the gate lets go of its delegate."""
        from tests.test_server import connect, make_server

        server = make_server()
        gate, transport = connect(server)
        self.assertIsNotNone(gate.ticket)
        freed = weakref.ref(gate)
        gate.connectionLost(Failure(ConnectionError("gone")))
        del gate
        transport.protocol = None
        self.assertIsNone(freed(), "the gate is freed by reference counting")

        gate, transport = connect(server)
        gate.dataReceived(b"\x00\x05bogus")
        gate.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual((gate.delegate, gate.ticket), (None, None))
