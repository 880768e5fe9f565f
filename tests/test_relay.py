"""Protocol tests for tunnelpass.relay.relay with in-memory transports and a fake clock."""

from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits


class RelayTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = TCPForwardFactory(
            self.reactor, "127.0.0.1:1/tcp", "127.0.0.1", 9999,
            Limits(max_conns=2, connect_timeout=3, idle=60),
        )

    def accept(self):
        inbound = self.factory.buildProtocol(None)
        transport = RelayTransport()
        inbound.makeConnection(transport)
        return inbound, transport

    def connect_remote(self, index=-1):
        host, port, client_factory, timeout, _ = self.reactor.tcpClients[index]
        outbound = client_factory.buildProtocol(None)
        transport = RelayTransport()
        outbound.makeConnection(transport)
        return outbound, transport

    def lose(self, protocol, transport):
        transport.connected = False
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_reading_paused_until_remote_connected(self):
        inbound, in_t = self.accept()
        self.assertEqual(in_t.producerState, "paused")
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9999, 3))
        outbound, out_t = self.connect_remote()
        self.assertEqual(in_t.producerState, "producing")

    def test_producers_registered_both_ways(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        self.assertIs(in_t.producer.transport, out_t)
        self.assertIs(out_t.producer.transport, in_t)
        self.assertTrue(in_t.streaming and out_t.streaming)

    def test_bytes_relayed_and_counted(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        inbound.dataReceived(b"request")
        outbound.dataReceived(b"reply!")
        self.assertEqual(out_t.value(), b"request")
        self.assertEqual(in_t.value(), b"reply!")
        self.assertEqual((self.factory.stats.bytes_in, self.factory.stats.bytes_out), (7, 6))

    def test_half_close_both_ways(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        inbound.readConnectionLost()
        self.assertTrue(out_t.write_closed)
        self.assertIsNone(out_t.producer, "a half-closed consumer must not wait on its producer")
        self.assertFalse(in_t.disconnecting)
        outbound.dataReceived(b"late reply")
        self.assertEqual(in_t.value(), b"late reply")
        outbound.readConnectionLost()
        self.assertTrue(in_t.write_closed)
        inbound.writeConnectionLost()
        self.assertTrue(in_t.disconnecting, "both halves done: the socket is closed")

    def test_remote_close_closes_accepted_side(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        self.lose(outbound, out_t)
        self.assertTrue(in_t.disconnecting)
        self.assertIsNone(in_t.producer)
        self.lose(inbound, in_t)
        self.assertEqual(self.factory.stats.active, 0)
        self.assertEqual(self.factory.relays, set())

    def test_client_close_closes_remote_side(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        self.lose(inbound, in_t)
        self.assertTrue(out_t.disconnecting)
        self.assertEqual(self.factory.stats.active, 0)

    def test_idle_timeout_aborts_both(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        self.reactor.advance(59)
        outbound.dataReceived(b"x")  # traffic either way resets the timer
        self.reactor.advance(59)
        self.assertFalse(in_t.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(in_t.disconnected and out_t.disconnected)
        self.assertEqual(self.factory.stats.idle_timeouts, 1)

    def test_no_idle_timer_while_connecting(self):
        inbound, in_t = self.accept()
        self.reactor.advance(1000)
        self.assertFalse(in_t.disconnecting)

    def test_max_conns_refuses_cleanly(self):
        self.accept()
        self.accept()
        inbound, in_t = self.accept()
        self.assertTrue(in_t.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2, "a refused connection dials nothing")
        self.assertEqual((self.factory.stats.refused, self.factory.stats.active), (1, 2))
        inbound.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.stats.active, 2)

    def test_refusals_logged_once_per_interval(self):
        events = []
        self.factory.log = Logger(observer=events.append)
        self.accept(), self.accept()
        for _ in range(5):
            self.accept()
        self.reactor.advance(11)
        self.accept()
        self.assertEqual([e["count"] for e in events], [1, 5])
        self.assertEqual(self.factory.stats.refused, 6)

    def test_connect_failure_closes_client(self):
        inbound, in_t = self.accept()
        _, _, client_factory, _, _ = self.reactor.tcpClients[0]
        client_factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(in_t.disconnecting)
        self.assertEqual(self.factory.stats.connect_failures, 1)
        client_factory.clientConnectionFailed(None, Failure(TimeoutError()))

    def test_client_gone_while_connecting_cancels_dial(self):
        inbound, in_t = self.accept()
        connector = self.reactor.connectors[0]
        stopped = []
        self.patch(connector, "stopConnecting", lambda: stopped.append(True))
        connector.state = "connecting"
        self.lose(inbound, in_t)
        self.assertEqual(stopped, [True])

    def test_remote_connecting_after_client_left_is_dropped(self):
        inbound, in_t = self.accept()
        self.lose(inbound, in_t)
        outbound, out_t = self.connect_remote()
        self.assertTrue(out_t.disconnected)

    def test_update_applies_to_new_connections_only(self):
        self.accept()
        self.factory.update("::1", 7, Limits(max_conns=5))
        self.accept()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 9999))
        self.assertEqual(self.reactor.tcpClients[1][:2], ("::1", 7))
        self.assertEqual(self.factory.remote, "[::1]:7")

    def test_hostname_remote_resolved_per_connection(self):
        self.factory.update("localhost", 7, Limits())
        inbound, in_t = self.accept()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 7), "resolved, then dialled")
        outbound, out_t = self.connect_remote()
        inbound.dataReceived(b"via name")
        self.assertEqual(out_t.value(), b"via name")
        self.assertEqual(in_t.producerState, "producing")

    def test_drain_waits_then_aborts(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.reactor.advance(4)
        self.assertEqual(done, [])
        self.reactor.advance(1)
        self.assertTrue(in_t.disconnected and out_t.disconnected)
        self.lose(inbound, in_t)
        self.assertEqual(done, [], "the aborted outbound leg is not gone yet")
        self.lose(outbound, out_t)
        self.assertEqual(done, [None])

    def test_drain_fires_when_last_relay_ends(self):
        inbound, in_t = self.accept()
        outbound, out_t = self.connect_remote()
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.lose(inbound, in_t)
        self.assertTrue(out_t.disconnecting)
        self.assertEqual(done, [], "the remote leg is still flushing what the client sent")
        self.lose(outbound, out_t)
        self.assertEqual(done, [None])
        self.assertEqual(self.reactor.getDelayedCalls(), [], "the drain deadline is cancelled")

    def test_drain_with_nothing_live(self):
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.assertEqual(done, [None])
