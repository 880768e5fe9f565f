"""Target groups: round robin, failover, cool-down."""

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits
from tunnelpass.relay.probe import LatencyProbe, start_probe
from tunnelpass.relay.targets import COOL_DOWN, TargetGroup

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


class LowestLatencyTests(unittest.TestCase):
    def test_prefers_the_lowest_measured_latency(self):
        group = TargetGroup([A, B, C], Clock(), strategy=1)
        self.assertEqual(group.order(), [0, 1, 2], "nothing measured yet: in order")
        group.probed(0, 0.200)
        group.probed(1, None)
        group.probed(2, 0.010)
        self.assertEqual(group.order(), [2, 0, 1], "fastest first, unreachable last")
        self.assertEqual(group.order(), [2, 0, 1], "sticky, not rotating")
        self.assertEqual(group.to_probe(), [0, 1, 2])

    def test_unmeasured_before_unreachable_and_a_failed_dial_goes_last(self):
        group = TargetGroup([A, B, C], Clock(), strategy=1)
        group.probed(0, None)
        group.probed(2, 0.5)
        self.assertEqual(group.order(), [2, 1, 0])
        group.failed(2)
        self.assertEqual(group.order(), [1, 0, 2])
        group.probed(2, 0.5)  # answers again
        self.assertEqual(group.order()[0], 2)


class PrimaryBackupTests(unittest.TestCase):
    def test_failover_stays_on_the_backup_until_the_fallback_interval(self):
        clock = Clock()
        group = TargetGroup([A, B, C], clock, strategy=2, fallback=300)
        switches = []
        group.on_switch = lambda old, new: switches.append((old, new))
        self.assertEqual(group.order(), [0, 1, 2])
        self.assertEqual(group.to_probe(), [], "nothing to probe on the primary")
        group.failed(0)
        self.assertEqual(group.order(), [1, 2, 0])
        group.succeeded(1)
        self.assertEqual(switches, [(0, 1)])
        clock.advance(COOL_DOWN + 1)  # the primary's cool-down is over, the fallback interval is not
        self.assertEqual(group.order(), [1, 0, 2])
        self.assertEqual(group.to_probe(), [0])
        clock.advance(300)
        self.assertEqual(group.order()[0], 0, "fallback interval over: the primary is tried first")
        group.succeeded(0)
        self.assertEqual(switches, [(0, 1), (1, 0)])
        self.assertEqual(group.order(), [0, 1, 2])

    def test_failed_failback_waits_another_interval(self):
        clock = Clock()
        group = TargetGroup([A, B], clock, strategy=2, fallback=60)
        group.failed(0)
        group.succeeded(1)
        clock.advance(60)
        self.assertEqual(group.order(), [0, 1])
        group.failed(0)
        group.succeeded(1)
        self.assertEqual(group.order(), [1, 0])
        clock.advance(59)
        self.assertEqual(group.order(), [1, 0])
        clock.advance(1)
        self.assertEqual(group.order(), [0, 1])

    def test_a_failed_probe_holds_the_failback(self):
        clock = Clock()
        group = TargetGroup([A, B], clock, strategy=2, fallback=60)
        group.failed(0)
        group.succeeded(1)
        clock.advance(61)
        group.probed(0, None)
        self.assertEqual(group.order(), [1, 0], "the primary does not answer probes: no user pays for it")
        group.probed(0, 0.001)
        self.assertEqual(group.order(), [0, 1])

    def test_a_backup_failing_goes_back_up_the_priority_list(self):
        group = TargetGroup([A, B, C], Clock(), strategy=2)
        group.failed(0)
        group.succeeded(1)
        group.failed(1)
        self.assertEqual(group.order(), [2, 0, 1])


class ProbeTests(unittest.TestCase):
    def test_probes_each_target_once_at_a_time_and_reports(self):
        reactor = MemoryReactorClock()
        tcp, udp = (TargetGroup([A, B], reactor, strategy=1) for _ in range(2))
        probe = LatencyProbe(reactor, [tcp, udp], "t", interval=5.0, timeout=10.0)
        probe.start()
        self.assertEqual([c[:2] for c in reactor.tcpClients], [A, B], "a round at start")
        self.assertEqual(reactor.tcpClients[0][3], 5.0, "connect timeout bounded by the interval")
        reactor.advance(5.0)
        self.assertEqual(len(reactor.tcpClients), 2, "one probe in flight per target")
        reactor.advance(0.25)
        proto = reactor.tcpClients[1][2].buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.disconnecting, "closed at once")
        reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        for group in (tcp, udp):
            self.assertEqual(group.latency, [float("inf"), 5.25])
            self.assertEqual(group.order(), [1, 0])
        reactor.advance(5.0)
        self.assertEqual(len(reactor.tcpClients), 4, "the next round probes both again")
        probe.stop()
        reactor.advance(50)
        self.assertEqual(len(reactor.tcpClients), 4)

    def test_relay_dials_the_fastest(self):
        reactor = MemoryReactorClock()
        factory = TCPForwardFactory(reactor, "t", *A, Limits(lbs=1), clock=reactor, remotes=[A, B, C])
        factory.group.probed(0, 0.3)
        factory.group.probed(1, 0.002)
        factory.group.probed(2, None)
        for _ in range(3):
            factory.buildProtocol(None).makeConnection(StringTransport())
        self.assertEqual([c[:2] for c in reactor.tcpClients], [B, B, B])

    def test_start_probe_only_when_needed(self):
        reactor = MemoryReactorClock()
        self.assertIsNone(start_probe(reactor, [TargetGroup([A, B], reactor)], "t", 5, 5))
        self.assertIsNone(start_probe(reactor, [TargetGroup([A], reactor, strategy=1)], "t", 5, 5))
        probe = start_probe(reactor, [TargetGroup([A, B], reactor, strategy=2)], "t", 0, 5)
        self.assertEqual(probe.interval, 5.0, "report interval 0: probe every 5 s anyway")
        probe.stop()
