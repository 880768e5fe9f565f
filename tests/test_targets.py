"""Target groups: round robin, failover, cool-down."""

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tunnelpass.relay import TCPForwardFactory
from tunnelpass.rules import Limits
from tunnelpass.targets import COOL_DOWN, TargetGroup

A, B, C = ("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)


class TargetGroupTests(unittest.TestCase):
    def test_round_robin(self):
        group = TargetGroup([A, B, C], Clock())
        self.assertEqual([group.order()[0] for _ in range(4)], [0, 1, 2, 0])

    def test_failed_target_cools_down_then_returns(self):
        clock = Clock()
        group = TargetGroup([A, B, C], clock)
        group.failed(0)
        self.assertEqual(group.order(), [1, 2, 0], "a cooling target goes last")
        clock.advance(COOL_DOWN)
        self.assertTrue(group.healthy(0))

    def test_all_down_still_tried(self):
        group = TargetGroup([A, B], Clock())
        group.failed(0)
        group.failed(1)
        self.assertEqual(sorted(group.order()), [0, 1])
        self.assertRaises(ValueError, TargetGroup, [], Clock())


class FailoverTests(unittest.TestCase):
    def test_connect_failure_moves_to_the_next_target(self):
        reactor = MemoryReactorClock()
        factory = TCPForwardFactory(reactor, "t", *A, Limits(), clock=reactor, remotes=[A, B, C])
        inbound = factory.buildProtocol(None)
        inbound.makeConnection(StringTransport())
        host, port, client_factory = reactor.tcpClients[0][:3]
        self.assertEqual((host, port), A)
        client_factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(reactor.tcpClients[1][:2], B, "failover to the next target")
        self.assertFalse(factory.group.healthy(0))
        reactor.tcpClients[1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        reactor.tcpClients[2][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(reactor.tcpClients), 3, "each target once per connection")
        self.assertTrue(inbound.transport.disconnecting)
        self.assertEqual(factory.stats.connect_failures, 1)

    def test_a_user_hanging_up_does_not_mark_the_target_unhealthy(self):
        reactor = MemoryReactorClock()
        factory = TCPForwardFactory(reactor, "t", *A, Limits(), clock=reactor, remotes=[A, B])
        inbound = factory.buildProtocol(None)
        inbound.makeConnection(StringTransport())
        inbound.connectionLost(None)  # the user went away while dialling
        reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(factory.group.healthy(0))
        self.assertEqual(len(reactor.tcpClients), 1, "no failover for a user who is gone")
