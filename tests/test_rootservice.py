"""tunnelpass.tap.TunnelpassService: the root of the service tree is the
only place that installs signal handlers and turns a typed startup error
into exit status 1 (services raise tunnelpass.ops.starterror.StartupError)."""

import signal

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from tunnelpass.ops import startup
from tunnelpass.ops.starterror import StartupError
from tunnelpass.tap import TunnelpassService


class _Signals:
    """Records what the root asks of tunnelpass.ops.signals.Signals."""

    def __init__(self, calls):
        self.calls = calls
        self.actions = {}

    def install_stop(self):
        self.calls.append("install_stop")

    def install(self, number, action):
        self.calls.append(("install", number))
        self.actions[number] = action

    def bound_stop(self, timeout):
        self.calls.append(("bound_stop", timeout))

    def restore(self):
        self.calls.append("restore")


class _Child(Service):
    def __init__(self, calls, name, reloads=True, stop=None, fail=None):
        self.calls, self.fail, self.stop = calls, fail, stop
        self.setName(name)
        if reloads:
            self.reload = lambda: calls.append(("reload", name))

    def privilegedStartService(self):
        self.calls.append(("privileged", self.name))
        if self.fail is not None:
            raise self.fail
        super().privilegedStartService()

    def stopService(self):
        super().stopService()
        self.calls.append(("stop", self.name))
        return self.stop


class RootSignalsTests(unittest.TestCase):
    def setUp(self):
        self.calls = []
        self.reactor = MemoryReactorClock()
        self.signals = _Signals(self.calls)
        self.root = TunnelpassService(lambda event: None, self.reactor, shutdown_timeout=7.0,
                                      signals=self.signals)
        self.patch(startup, "log", Logger(namespace="tunnelpass.startup", observer=lambda e: None))

    def test_stop_handlers_before_any_child_binds_and_again_once_running(self):
        _Child(self.calls, "a").setServiceParent(self.root)
        self.root.privilegedStartService()
        self.assertEqual(self.calls, ["install_stop", ("privileged", "a")])
        self.root.startService()
        self.assertIn(("install", signal.SIGHUP), self.calls)
        self.calls.clear()
        for call in list(self.reactor.whenRunningHooks):
            call[0](*call[1], **call[2])
        self.assertIn("install_stop", self.calls, "the reactor installed its own at start: ours go back on")

    def test_sighup_reaches_every_child_that_reloads(self):
        for name, reloads in (("server", True), ("metrics", False), ("other", True)):
            _Child(self.calls, name, reloads=reloads).setServiceParent(self.root)
        self.root.startService()
        self.calls.clear()
        self.signals.actions[signal.SIGHUP]()
        self.assertEqual(self.calls, [("reload", "server"), ("reload", "other")])

    def test_stop_is_bounded_and_handlers_restored_after_children_stopped(self):
        pending = Deferred()
        _Child(self.calls, "a", stop=pending).setServiceParent(self.root)
        self.root.startService()
        self.calls.clear()
        self.root.stopService()
        self.assertEqual(self.calls, [("bound_stop", 7.0), ("stop", "a")])
        pending.callback(None)
        self.assertEqual(self.calls[-1], "restore")

    def test_real_signals_installed_only_by_the_root(self):
        before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        root = TunnelpassService(lambda event: None, self.reactor)
        root.privilegedStartService()
        root.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before[signal.SIGHUP])
        self.assertNotEqual(signal.getsignal(signal.SIGTERM), before[signal.SIGTERM])
        root.stopService()
        self.assertEqual({n: signal.getsignal(n) for n in before}, before)


class TypedStartupErrorTests(unittest.TestCase):
    def test_startup_error_becomes_one_line_and_status_1(self):
        events, failed = [], []
        self.patch(startup, "log", Logger(namespace="tunnelpass.startup", observer=events.append))

        class Launcher:
            def failed(self, message):
                failed.append(message)

        root = TunnelpassService(lambda event: None, launcher=Launcher())
        _Child([], "server", fail=StartupError("--tunnel: cannot listen on 127.0.0.1:1: Address already in use")
               ).setServiceParent(root)
        with self.assertRaises(SystemExit) as cm:
            root.privilegedStartService()
        self.assertEqual(cm.exception.code, 1)
        (event,) = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(event["event"], "startup_failed")
        self.assertEqual(formatEvent(event),
                         "tunnelpass: --tunnel: cannot listen on 127.0.0.1:1: Address already in use")
        self.assertEqual(failed, ["tunnelpass: --tunnel: cannot listen on 127.0.0.1:1: Address already in use"])
        self.assertFalse([e for e in events if e.get("log_failure")], "no traceback, not even at debug")
