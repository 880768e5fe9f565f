"""Unreachable targets: the reason as text, one warning per target per interval,
and the relay's dial path using them."""

import errno
import os

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits
from tunnelpass.relay.targetlog import TargetWarnings, why_unreachable


class WhyTests(unittest.TestCase):
    def test_reasons_as_text(self):
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.TimeoutError(), "timed out"),
            (error.TCPTimedOutError(), "timed out"),
            (defer.TimeoutError(), "timed out"),
            (error.DNSLookupError("Couldn't find the hostname 'nx.invalid'"), "name not resolved"),
            (error.NoRouteError(), "network unreachable"),
            (error.getConnectError((errno.EHOSTUNREACH, "No route to host")), "no route to host"),
            (error.getConnectError((errno.EPROTO, "Protocol error")), f"{os.strerror(errno.EPROTO)} (EPROTO)"),
            (OSError(errno.ECONNRESET, "reset"), "connection reset"),
        ]
        for value, text in cases:
            self.assertEqual(why_unreachable(Failure(value)), text, value)
            self.assertNotIn("<", why_unreachable(value), "never a repr")


class ThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.warnings = TargetWarnings(self.clock)
        self.warnings.log = Logger(observer=self.events.append, namespace="test")

    def test_first_at_once_then_once_per_interval_per_target(self):
        refused = Failure(error.ConnectionRefusedError())
        self.assertTrue(self.warnings.failed("target", "127.0.0.1", 9, refused))
        for _ in range(4):
            self.assertFalse(self.warnings.failed("target", "127.0.0.1", 9, refused))
        self.assertTrue(self.warnings.failed("target", "::1", 9, refused), "another target has its own throttle")
        self.clock.advance(10)
        self.assertTrue(self.warnings.failed("target", "127.0.0.1", 9, Failure(error.TimeoutError())))
        self.assertEqual([(e["target"], e["reason"], e["count"]) for e in self.events],
                         [("127.0.0.1:9", "connection refused", 1), ("[::1]:9", "connection refused", 1),
                          ("127.0.0.1:9", "timed out", 5)])
        for event in self.events:
            self.assertEqual(event["log_level"], LogLevel.warn)
            self.assertEqual(event["event"], "connect_failed")
        self.assertEqual(formatEvent(self.events[0]), "target: cannot reach target 127.0.0.1:9 (tcp): connection refused")
        self.assertEqual(formatEvent(self.events[-1]), "target: cannot reach target 127.0.0.1:9 (tcp): timed out "
                                                       "(5 failures since the last warning)")

    def test_tracked_targets_bounded(self):
        warnings = TargetWarnings(self.clock, limit=3)
        warnings.log = Logger(observer=lambda e: None)
        for port in range(10):
            warnings.failed("target", "127.0.0.1", port, "connection refused")
        self.assertEqual(len(warnings._throttles), 3)


class RelayDialTests(unittest.TestCase):
    """The relay's dial path warns with the target and the reason."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.events = []
        self.factory = TCPForwardFactory(self.reactor, "target", "127.0.0.1", 9999, Limits(connect_timeout=3))
        self.factory.target_warnings.log = Logger(observer=self.events.append)

    def accept(self):
        inbound = self.factory.buildProtocol(None)
        transport = RelayTransport()
        inbound.makeConnection(transport)
        return inbound, transport

    def test_refused_target_warns_and_counts(self):
        for _ in range(3):
            inbound, transport = self.accept()
            self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats.connect_failures, 3)
        self.assertEqual(len(self.events), 1, "throttled per target")
        event = self.events[0]
        self.assertEqual((event["target"], event["reason"], event["listener"]),
                         ("127.0.0.1:9999", "connection refused", "target"))

    def test_each_target_of_a_group_is_named(self):
        self.factory.update("127.0.0.1", 1, Limits(connect_timeout=3), remotes=[("127.0.0.1", 1), ("127.0.0.2", 2)])
        inbound, transport = self.accept()
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.assertEqual([(e["target"], e["reason"]) for e in self.events],
                         [("127.0.0.1:1", "connection refused"), ("127.0.0.2:2", "timed out")])
        self.assertEqual(self.factory.stats.connect_failures, 1, "one user refused")

    def test_user_gone_while_dialling_is_not_the_target(self):
        inbound, transport = self.accept()
        transport.connected = False
        inbound.connectionLost(Failure(error.ConnectionDone()))
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(error.UserError()))
        self.assertEqual(self.events, [])


class UDPTargetTests(unittest.TestCase):
    """A UDP target answering ICMP port unreachable is named too."""

    def test_tunnel_egress_target_refused(self):
        from tests.test_udptunnel import EgressTests

        helper = EgressTests("test_disabled_refuses")
        helper.setUp()
        egress = helper.egress()
        events = []
        egress.target_warnings.log = Logger(observer=events.append)
        for _ in range(3):
            helper.start(egress)
            helper.reactor.ports[-1].protocol.connectionRefused()
        self.assertEqual([(e["target"], e["protocol"], e["reason"]) for e in events],
                         [("127.0.0.1:53", "udp", "port unreachable (ICMP)")])

    def test_forwarder_session_target_refused(self):
        from tunnelpass.relay.udp import UDPForwardProtocol, UDPSession

        forwarder = UDPForwardProtocol(MemoryReactorClock(), "test/udp", "127.0.0.1", 9, Limits(), clock=Clock())
        events = []
        forwarder.target_warnings.log = Logger(observer=events.append)
        session = UDPSession(forwarder, ("192.0.2.1", 5))
        session.connectionRefused()
        self.assertEqual([(e["target"], e["protocol"]) for e in events], [("127.0.0.1:9", "udp")])
        self.assertEqual(forwarder.stats.udp_drops, 1)


class PoolRefusalTests(unittest.TestCase):
    def test_refused_for_no_pool_is_a_structured_warning(self):
        from tunnelpass.carriers.opener import PoolOpener
        from tunnelpass.tunnel.pooldial import PoolDialFactory

        factory = PoolDialFactory(MemoryReactorClock(), "target", "127.0.0.1", 1, Limits())
        factory.opener = PoolOpener(lambda: None)
        events = []
        factory.log = Logger(observer=events.append)
        inbound = factory.buildProtocol(None)
        transport = RelayTransport()
        inbound.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        [event] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual((event["event"], event["why"]), ("user_refused", "not connected"))
        self.assertEqual(factory.stats.connect_failures, 1)
