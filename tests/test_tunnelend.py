"""tunnelpass.tunnel.tunnelend: the base both tunnel ends share (periodic work as
TimerService children, the drain on stop), and the rule that a service
never installs a signal handler (tunnelpass.tap's root does)."""

import signal

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from tunnelpass.tunnel import tunnelend
from tunnelpass.config.limits import Limits
from tunnelpass.tunnel.server import ServerSettings, TunnelServer
from tunnelpass.tunnel.tunnelend import Periodic, TunnelEnd

KEY = "k" * 32


class _Settings:
    key = KEY
    max_pool = 16
    report_interval = 10.0
    shutdown_timeout = 5.0
    limits = Limits()
    tcp = udp = True


class _Factory:
    """A relay factory whose drain fires when the test says."""

    def __init__(self):
        self.drains = []

    def drain(self, timeout):
        d = Deferred()
        self.drains.append((timeout, d))
        return d


class _End(TunnelEnd):
    def __init__(self, reactor):
        super().__init__(_Settings(), reactor)
        self.reports = []
        self.closed = 0
        self.factory = _Factory()

    def report(self, final=False):
        self.reports.append(final)

    def close_session(self):
        self.closed += 1

    def drained_factories(self):
        return [self.factory]


class TunnelEndTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.patch(tunnelend, "raise_fd_limit", lambda: 4096)
        self.end = _End(self.reactor)

    def start(self):
        self.end.privilegedStartService()
        self.end.startService()

    def test_periodic_work_is_a_timer_service_child(self):
        timer = self.end.getServiceNamed("report")
        self.assertIsInstance(timer, TimerService)
        self.assertEqual(timer.name, "report")
        self.assertFalse(timer.running)
        self.start()
        self.assertTrue(timer.running, "started with the end")
        self.assertEqual(self.end.reports, [], "no health line at the start itself")
        self.reactor.advance(10)
        self.reactor.advance(10)
        self.assertEqual(self.end.reports, [False, False])
        self.end.stopService()
        self.assertFalse(timer.running, "stopped with the end")
        self.end.factory.drains[0][1].callback(None)
        self.reactor.advance(100)
        self.assertEqual(self.end.reports, [False, False, True], "only the final line after the stop")

    def test_heap_is_trimmed_after_a_burst_of_connections_ended(self):
        memory = self.end.getServiceNamed("memory")
        trims = []
        memory.watcher.trim = lambda: trims.append(1)
        self.start()
        self.end.stats.active = self.end.stats.accepted = 3000
        self.reactor.advance(10)
        self.end.stats.active = 10
        self.reactor.advance(10)
        self.assertEqual(trims, [1])

    def test_every_adds_a_named_child(self):
        calls = []
        timer = self.end.every(1.0, lambda: calls.append(1), "fill")
        self.assertIs(self.end.getServiceNamed("fill"), timer)
        self.start()
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual(calls, [1, 1])

    def test_stop_drains_then_reports_the_final_line(self):
        self.start()
        stopped = []
        self.end.stopService().addCallback(stopped.append)
        self.assertEqual(self.end.closed, 1, "the session closes as the stop begins")
        ((timeout, drain),) = self.end.factory.drains
        self.assertEqual(timeout, 5.0, "--shutdown-timeout bounds the drain")
        self.assertEqual((stopped, self.end.reports), ([], []), "the stop waits for the drain")
        drain.callback(None)
        self.assertEqual(self.end.reports, [True])
        self.assertEqual(len(stopped), 1)

    def test_periodic_first_call_comes_one_step_after_start(self):
        calls = []
        timer = Periodic(3.0, lambda: calls.append(self.reactor.seconds()), "x", self.reactor)
        timer.startService()
        self.reactor.advance(3)
        timer.stopService()
        timer.startService()  # a restart waits a step again
        self.reactor.advance(3)
        self.assertEqual(calls, [3.0, 6.0])
        timer.stopService()


class NoSignalHandlersTests(unittest.TestCase):
    """Only the root of the service tree (tunnelpass.tap) installs signal
    handlers: a tunnel end never does (several can share a process)."""

    def handlers(self):
        return {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def test_server_installs_none(self):
        self.patch(tunnelend, "raise_fd_limit", lambda: 4096)
        before = self.handlers()
        reactor = MemoryReactorClock()
        server = TunnelServer(ServerSettings(tunnel_host="127.0.0.1", tunnel_port=0, target_host="127.0.0.1",
                                             target_port=0, key=KEY, udp=False, report_interval=0), reactor)
        server.privilegedStartService()
        server.startService()
        reactor.advance(0)
        self.assertEqual(self.handlers(), before)
        server.stopService()
        self.assertEqual(self.handlers(), before)
