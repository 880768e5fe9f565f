"""Tests for tunnelpass.forward.service: the listener tree and reload by diff, on a
memory reactor (no sockets)."""

import resource
import signal

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tunnelpass.forward.service import ForwardSettings, ForwarderService, load_rules
from tunnelpass.ops.osutil import raise_fd_limit
from tunnelpass.ops.starterror import StartupError
from tunnelpass.config.rules import RulesError, parse_rules


class FakePort:
    def __init__(self, reactor, port, interface, protocol):
        self.reactor, self.port, self.interface, self.protocol = reactor, port, interface, protocol
        self.listening = True

    def stopListening(self):
        self.listening = False
        self.reactor.stopped.append((self.interface, self.port, self.protocol))


class Reactor(MemoryReactorClock):
    """Records listening ports; a port number in ``busy`` fails to bind."""

    def __init__(self):
        super().__init__()
        self.ports, self.stopped, self.busy = [], [], set()

    def _listen(self, port, interface, protocol):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        fake = FakePort(self, port, interface, protocol)
        self.ports.append(fake)
        return fake

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._listen(port, interface, "tcp")

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return self._listen(port, interface, "udp")


class ForwarderTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.reactor = Reactor()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def start(self, text):
        self.write(text)
        self.service = ForwarderService(ForwardSettings(config=self.path, report_interval=0),
                                        load_rules(self.path), self.reactor)
        self.service.privilegedStartService()
        self.service.startService()
        return self.service

    def listening(self):
        return sorted((p.interface, p.port, p.protocol) for p in self.reactor.ports if p.listening)

    def messages(self, fragment):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if fragment in formatEvent(e)]

    def test_each_endpoint_is_a_listener(self):
        self.start("127.0.0.1:1/tcp+udp | a | 2\n3 | b | 4\n")
        self.assertEqual(self.listening(), [("0.0.0.0", 3, "tcp"), ("127.0.0.1", 1, "tcp"), ("127.0.0.1", 1, "udp")])

    def test_reload_diffs_by_endpoint(self):
        service = self.start("127.0.0.1:1 | a | 2\n127.0.0.1:3 | b | 4\n127.0.0.1:5 | c | 6\n")
        kept = self.reactor.ports[0]
        updated = service.getServiceNamed("127.0.0.1:5/tcp")
        self.write("# moved\n127.0.0.1:1 | a | 2\n127.0.0.1:5 | c | 7\n127.0.0.1:9 | d | 10\n")
        service.reload()
        self.assertTrue(kept.listening, "an unchanged rule keeps its socket")
        self.assertEqual(self.reactor.stopped, [("127.0.0.1", 3, "tcp")])
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp"), ("127.0.0.1", 5, "tcp"), ("127.0.0.1", 9, "tcp")])
        self.assertIs(service.getServiceNamed("127.0.0.1:5/tcp"), updated, "updated in place")
        self.assertEqual(updated.relay.remote, "c:7")
        self.assertEqual(len(self.messages("1 added, 1 removed, 1 updated, 1 unchanged, 0 failed")), 1)

    def test_invalid_reload_keeps_everything(self):
        service = self.start("127.0.0.1:1 | a | 2\n")
        self.write("127.0.0.1:1 | a | 2\n127.0.0.1:1 | b | 3\n")
        service.reload()
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp")])
        self.assertEqual(self.reactor.stopped, [])
        (message,) = self.messages("reload rejected")
        self.assertIn(f"{self.path}:2: listen address 127.0.0.1:1/tcp overlaps", message)

    def test_failed_bind_on_reload_skips_only_that_rule(self):
        service = self.start("127.0.0.1:1 | a | 2\n")
        self.reactor.busy.add(7)
        self.write("127.0.0.1:1 | a | 2\n127.0.0.1:7 | b | 3\n127.0.0.1:8 | c | 4\n")
        service.reload()
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp"), ("127.0.0.1", 8, "tcp")])
        self.assertNotIn("127.0.0.1:7/tcp", service.namedServices)
        self.assertTrue(self.messages(f"{self.path}:2: cannot listen on 127.0.0.1:7/tcp"))

    def test_overlapping_reloads_coalesce(self):
        service = self.start("127.0.0.1:1 | a | 2\n")
        passes = []
        original = service._reload_once

        async def counted():
            passes.append(1)
            if len(passes) == 1:  # requests arriving during the first pass
                service.reload()
                service.reload()
                service.reload()
            await original()

        service._reload_once = counted
        service.reload()
        self.assertEqual(len(passes), 2, "three requests during a pass make one more pass")
        service.reload()
        self.assertEqual(len(passes), 3)

    def test_reload_while_stopping_is_ignored(self):
        service = self.start("127.0.0.1:1 | a | 2\n")
        self.write("127.0.0.1:3 | b | 4\n")
        service.stopService()
        service.reload()
        self.assertTrue(self.messages("reload ignored: the forwarder is stopping"))
        self.assertEqual(self.reactor.stopped, [("127.0.0.1", 1, "tcp")])
        self.assertEqual([p.port for p in self.reactor.ports], [1], "nothing new was bound")

    def test_bind_failure_at_startup_is_fatal_and_releases_ports(self):
        self.write("127.0.0.1:1 | a | 2\n127.0.0.1:7 | b | 3\n")
        self.reactor.busy.add(7)
        service = ForwarderService(ForwardSettings(config=self.path), load_rules(self.path), self.reactor)
        with self.assertRaises(StartupError) as cm:
            service.privilegedStartService()
        self.assertEqual(str(cm.exception), "cannot listen on 127.0.0.1:7/tcp: Address already in use")
        self.assertEqual(self.listening(), [])

    def test_installs_no_signal_handler(self):
        """Signals belong to the root of the service tree (tunnelpass.tap):
        the forwarder only offers reload()."""
        before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        self.start("127.0.0.1:1 | a | 2\n")
        self.reactor.advance(0)
        self.assertEqual({n: signal.getsignal(n) for n in before}, before)

    def test_reload_interval_notices_file_changes(self):
        self.write("127.0.0.1:1 | a | 2\n")
        service = ForwarderService(ForwardSettings(config=self.path, reload_interval=1, report_interval=0),
                                   load_rules(self.path), self.reactor)
        service.privilegedStartService()
        service.startService()
        self.reactor.advance(1)
        self.assertEqual(self.messages("reloaded"), [], "no change, no reload")
        self.write("127.0.0.1:1 | a | 2\n127.0.0.1:2 | b | 3\n")
        self.reactor.advance(1)
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp"), ("127.0.0.1", 2, "tcp")])

    def test_stats_reported_periodically(self):
        self.write("127.0.0.1:1 | a | 2\n127.0.0.1:3/udp | b | 4\n")
        service = ForwarderService(ForwardSettings(config=self.path, report_interval=5),
                                   load_rules(self.path), self.reactor)
        service.privilegedStartService()
        service.startService()
        self.reactor.advance(5)
        self.reactor.advance(5)
        stats = [e for e in self.events if e.get("event") == "stats"]
        self.assertEqual(len(stats), 4)
        self.assertEqual((stats[0]["listener"], stats[0]["remote"], stats[0]["active"]), ("127.0.0.1:1/tcp", "a:2", 0))
        self.assertEqual(stats[1]["listener"], "127.0.0.1:3/udp")
        self.assertIn("udp_sessions=0 sessions_total=0", formatEvent(stats[1]))
        self.assertIn("refused=0", formatEvent(stats[0]))

    def test_missing_file(self):
        with self.assertRaises(RulesError) as cm:
            load_rules("/nonexistent/x.conf")
        self.assertIn("cannot read rules file", str(cm.exception))

    def test_fd_limit_raised_to_hard_limit(self):
        raise_fd_limit()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(soft, hard)

    def test_parse_rules_used_by_forwarder_is_the_parser(self):
        self.write("1 | a | 2\n")
        self.assertEqual(load_rules(self.path), parse_rules("1 | a | 2\n", self.path))


class ReloadSafetyTests(unittest.TestCase):
    """A reload that would remove every rule needs the file to say so."""

    setUp, write, start = ForwarderTests.setUp, ForwarderTests.write, ForwarderTests.start
    listening, messages = ForwarderTests.listening, ForwarderTests.messages

    def warnings(self, event):
        from twisted.logger import LogLevel
        return [e for e in self.events if e.get("event") == event and e["log_level"] == LogLevel.warn]

    def test_empty_file_on_reload_is_refused(self):
        service = self.start("127.0.0.1:1 | a | 2\n127.0.0.1:3/udp | b | 4\n")
        for text in ("", "# half-written\n", "\n  \n"):
            self.write(text)
            service.reload()
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp"), ("127.0.0.1", 3, "udp")])
        self.assertEqual(self.reactor.stopped, [])
        refused = self.warnings("reload_refused")
        self.assertEqual(len(refused), 3)
        self.assertEqual((refused[0]["path"], refused[0]["running"]), (self.path, 2))
        self.assertIn("put the line '# tunnelpass: empty' in it", formatEvent(refused[0]))
        self.assertEqual(service.reloads, 0)

    def test_marked_empty_file_removes_every_rule_by_name(self):
        service = self.start("127.0.0.1:1 | a | 2\n127.0.0.1:3/udp | b | 4\n")
        self.write("# tunnelpass: empty\n")
        service.reload()
        self.assertEqual(self.listening(), [])
        self.assertEqual(self.warnings("reload_refused"), [])
        removed = self.warnings("rule_removed")
        self.assertEqual(sorted((e["listener"], e["remote"]) for e in removed),
                         [("127.0.0.1:1/tcp", "a:2"), ("127.0.0.1:3/udp", "b:4")])
        self.assertIn("rule removed: 127.0.0.1:1/tcp -> a:2", formatEvent(removed[0]))
        self.assertEqual(len(self.messages("0 added, 2 removed")), 1)

    def test_partial_removal_warns_for_each_removed_rule_only(self):
        service = self.start("127.0.0.1:1 | a | 2\n127.0.0.1:3 | b | 4\n")
        self.write("127.0.0.1:3 | b | 4\n")
        service.reload()
        self.assertEqual([e["listener"] for e in self.warnings("rule_removed")], ["127.0.0.1:1/tcp"])

    def test_empty_file_when_nothing_runs_is_a_plain_reload(self):
        service = self.start("")
        self.write("")
        service.reload()
        self.assertEqual(self.warnings("reload_refused"), [])
        self.assertEqual(service.reloads, 1)

    def test_unreadable_or_invalid_file_keeps_the_rules(self):
        service = self.start("127.0.0.1:1 | a | 2\n")
        self.write("127.0.0.1:1 | a\n")
        service.reload()
        import os
        os.remove(self.path)
        service.reload()
        self.assertEqual(self.listening(), [("127.0.0.1", 1, "tcp")])
        rejected = [e for e in self.events if e.get("event") == "reload_rejected"]
        self.assertEqual(len(rejected), 2)
        self.assertIn("cannot read rules file", formatEvent(rejected[1]))


class TrafficForwarderHintTests(unittest.TestCase):
    """traffic-forwarder's flags get a one-line pointer to ours, before getopt
    reads ``-conf`` as ``-c onf``."""

    def assertHint(self, args, expected):
        from twisted.python import usage
        from tests.test_tap import parse

        with self.assertRaises(usage.UsageError) as cm:
            parse(args)
        self.assertEqual(str(cm.exception), expected)

    def test_each_flag_in_each_form(self):
        conf = ("-conf is traffic-forwarder's flag: use --config FILE "
                "(the same 'local_port | remote_host | remote_port' file works)")
        self.assertHint(["--mode", "forward", "-conf", "tf.conf"], conf)
        self.assertHint(["-conf=tf.conf"], conf)
        self.assertHint(["--mode", "forward", "-timeout", "30s"],
                        "-timeout is traffic-forwarder's flag: use --connect-timeout DURATION (time to reach "
                        "the remote) and --idle DURATION (close connections quiet that long)")
        self.assertHint(["--timeout=30s"], "--timeout is traffic-forwarder's flag: use --connect-timeout DURATION "
                        "(time to reach the remote) and --idle DURATION (close connections quiet that long)")
        self.assertHint(["--mode", "forward", "-max-conns", "10"],
                        "-max-conns is traffic-forwarder's flag: use --max-conns N (concurrent connections per rule)")

    def test_our_own_flags_are_untouched(self):
        from tests.test_tap import parse

        options = parse(["--mode", "forward", "--max-conns", "10", "--conf", "x.conf", "-c", "y.conf"])
        self.assertEqual((options["max-conns"], options["config"]), (10, "y.conf"))
