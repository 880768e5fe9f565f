"""Logs an operator can use: the JSON schema (tunnelpass.ops.jsonlog), where
logs go under twistd (tunnelpass.ops.logs) and the per-connection debug trace
(tunnelpass.ops.connlog)."""

import io
import json
import os
import re
import signal

from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LegacyLogObserverWrapper, Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tunnelpass.ops import connlog
from tunnelpass.ops.jsonlog import json_line, record
from tunnelpass.ops.logs import log_stream, make_observer, twistd_options
from tests.poolfakes import PoolMember
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.tunnel.pooldial import PoolDialFactory
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$")


def emitted(emit):
    """The events *emit(logger)* logs through a tunnelpass-style Logger."""
    events = []
    emit(Logger(namespace="tunnelpass.server", observer=events.append))
    return events


class JSONSchemaTests(unittest.TestCase):
    def assertFlat(self, line: str) -> dict:
        """One line of JSON with the schema keys and no Twisted internals."""
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        out = json.loads(line)
        for key in ("time", "level", "logger", "message", "event"):
            self.assertIn(key, out)
        self.assertRegex(out["time"], RFC3339)
        leaked = [k for k in out if k.startswith("log_") or k.startswith("__") or k in ("format", "isError")]
        self.assertEqual(leaked, [])
        self.assertNotIn("unpersistable", line.lower())
        return out

    def test_tunnelpass_event_with_fields(self):
        (event,) = emitted(lambda log: log.warn(
            "session replaced: {old} by {new} ({count} times)", old="192.0.2.1:4000", new="192.0.2.2:4001",
            count=3, rtt_ms=1.5, client=True, event="session_replaced"))
        out = self.assertFlat(json_line(event))
        self.assertEqual(out, {
            "time": out["time"], "level": "warn", "logger": "tunnelpass.server",
            "message": "session replaced: 192.0.2.1:4000 by 192.0.2.2:4001 (3 times)", "event": "session_replaced",
            "old": "192.0.2.1:4000", "new": "192.0.2.2:4001", "count": 3, "rtt_ms": 1.5, "client": True,
        })

    def test_event_without_a_name_and_every_level(self):
        for level, name in ((LogLevel.debug, "debug"), (LogLevel.info, "info"), (LogLevel.warn, "warn"),
                            (LogLevel.error, "error"), (LogLevel.critical, "critical")):
            (event,) = emitted(lambda log: log.emit(level, "plain {n}", n=1))
            out = self.assertFlat(json_line(event))
            self.assertEqual((out["level"], out["event"], out["message"], out["n"]), (name, "log", "plain 1", 1))

    def test_failure_has_a_traceback_key(self):
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        (event,) = emitted(lambda log: log.failure("reload of {path} failed", failure, path="/etc/x",
                                                   event="reload"))
        out = self.assertFlat(json_line(event))
        self.assertEqual((out["level"], out["message"], out["event"], out["path"]),
                         ("critical", "reload of /etc/x failed", "reload", "/etc/x"))
        self.assertIn("Traceback", out["traceback"])
        self.assertIn("ZeroDivisionError", out["traceback"])

    def test_twisted_legacy_events(self):
        """log.msg (e.g. "Starting factory") and log.err come out well-formed."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        legacy_log.msg("Starting factory <tunnelpass.forward.Something object at 0x7f>")
        legacy_log.msg("two", "parts", system="UDP", extra=7)
        legacy_log.err(Failure(ValueError("bad rules")), "reloading failed")
        self.flushLoggedErrors(ValueError)
        started, parts, error = (self.assertFlat(json_line(e)) for e in events[-3:])
        self.assertEqual((started["message"], started["logger"], started["event"], started["level"]),
                         ("Starting factory <tunnelpass.forward.Something object at 0x7f>", "log_legacy", "log",
                          "info"))
        self.assertEqual(set(started), {"time", "level", "logger", "message", "event"})
        self.assertEqual((parts["message"], parts["extra"]), ("two parts", 7))
        self.assertNotIn("system", parts)
        self.assertEqual((error["message"], error["level"]), ("reloading failed", "critical"))
        self.assertIn("ValueError: bad rules", error["traceback"])

    def test_event_that_went_through_twisteds_legacy_bridge(self):
        """A legacy observer before ours adds message/time/system/format keys
        to the shared event: they are not the event's fields."""
        (event,) = emitted(lambda log: log.info("health: active={active}", active=2, event="health"))
        LegacyLogObserverWrapper(lambda e: None)(event)
        self.assertIn("isError", event)
        out = self.assertFlat(json_line(event))
        self.assertEqual(set(out), {"time", "level", "logger", "message", "event", "active"})
        self.assertEqual(out["message"], "health: active=2")

    def test_fields_that_json_cannot_carry(self):
        class Opaque:
            def __str__(self):
                return "opaque thing"

        class Broken:
            def __str__(self):
                raise RuntimeError("no")

        (event,) = emitted(lambda log: log.info(
            "odd fields", obj=Opaque(), raw=b"\x00\xff", nan=float("nan"), inf=float("inf"), tags={"b", "a"},
            nested={"k": [1, (2, Opaque())], 3: None}, broken=Broken(), level_field=LogLevel.warn,
            reason=Failure(ConnectionRefusedError("nobody home")), message="mine", time="noon",
            traceback="not one", logger="x"))
        event["level"] = 3  # (Logger.info itself takes no field called "level")
        out = self.assertFlat(json_line(event))
        self.assertEqual(out["obj"], "opaque thing")
        self.assertEqual(out["raw"], str(b"\x00\xff"))
        self.assertEqual((out["nan"], out["inf"]), ("nan", "inf"))
        self.assertEqual(out["tags"], ["a", "b"])
        self.assertEqual(out["nested"], {"k": [1, [2, "opaque thing"]], "3": None})
        self.assertEqual(out["broken"], "<Broken that cannot be rendered>")
        self.assertEqual(out["level_field"], "warn")
        self.assertIn("nobody home", out["reason"])
        # Schema names stay the schema's; the event's own fields are prefixed.
        self.assertEqual((out["message"], out["level"], out["logger"]), ("odd fields", "info", "tunnelpass.server"))
        self.assertEqual((out["field_message"], out["field_level"], out["field_time"], out["field_traceback"],
                          out["field_logger"]), ("mine", 3, "noon", "not one", "x"))
        self.assertNotIn("traceback", out)

    def test_record_time_is_the_events(self):
        (event,) = emitted(lambda log: log.info("x"))
        event["log_time"] = 0.25
        stamp = record(event)["time"]
        self.assertRegex(stamp, RFC3339)
        from datetime import datetime

        self.assertEqual(datetime.fromisoformat(stamp).timestamp(), 0.25)


class FakeSyslog:
    def __init__(self):
        self.opened, self.sent = None, []

    def openlog(self, prefix, options, facility):
        self.opened = (prefix, options, facility)

    def syslog(self, priority, line):
        self.sent.append((priority, line))


class DestinationTests(unittest.TestCase):
    """The observer writes where twistd would, with tunnelpass's filter and format."""

    def twistd(self, *argv):
        """twistd's real options, parsed with the tunnelpass plugin as the subcommand."""
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions([*argv, "tunnelpass", "--mode", "forward"])
        return config.subOptions

    def keep_sigusr1(self):
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)

    def test_plugin_options_lead_to_twistds(self):
        from tunnelpass.tap import Options

        self.assertIsNone(twistd_options(Options()))  # no twistd above it (tests, or twist)
        options = self.twistd("-n", "--pidfile=", "--logfile", "x.log")
        self.assertEqual(twistd_options(options)["logfile"], "x.log")

    def test_logfile_gets_the_filtered_json_lines(self):
        self.keep_sigusr1()
        path = os.path.abspath(self.mktemp())
        twistd = twistd_options(self.twistd("-n", "--pidfile=", "--logfile", path))
        stdout = io.StringIO()
        self.patch(__import__("sys"), "stdout", stdout)
        observer = make_observer("info", "json", twistd=twistd)
        log = Logger(namespace="tunnelpass.forward", observer=observer)
        log.debug("not at info level", event="conn_accept")
        log.info("forwarder running", event="forwarder_running", rules=1)
        with open(path) as f:
            (line,) = f.read().splitlines()
        self.assertEqual({k: v for k, v in json.loads(line).items() if k != "time"},
                         {"level": "info", "logger": "tunnelpass.forward", "message": "forwarder running",
                          "event": "forwarder_running", "rules": 1})
        self.assertEqual(stdout.getvalue(), "")
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL, "SIGUSR1 rotates, as in twistd")

    def test_where_twistd_would_log(self):
        import sys

        self.assertIs(log_stream(None), sys.stdout)
        self.assertIs(log_stream({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(log_stream({"nodaemon": True, "logfile": "-"}), sys.stdout)
        with self.assertRaises(SystemExit) as cm:
            log_stream({"nodaemon": False, "logfile": "-"})
        self.assertIn("daemon cannot log to standard output", str(cm.exception))
        with self.assertRaises(SystemExit) as cm:
            log_stream({"nodaemon": True, "logfile": "/nonexistent/dir/x.log"})
        self.assertIn("--logfile /nonexistent/dir/x.log: cannot open it", str(cm.exception))
        self.keep_sigusr1()
        here = os.getcwd()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chdir(directory)
        self.addCleanup(os.chdir, here)
        daemon_default = log_stream({"nodaemon": False, "logfile": ""})
        self.addCleanup(daemon_default.close)
        self.assertEqual(daemon_default.path, os.path.join(directory, "twistd.log"))

    def test_syslog_at_each_levels_priority(self):
        import syslog

        for fmt in ("text", "json"):
            fake = FakeSyslog()
            self.patch(syslog, "openlog", fake.openlog)
            self.patch(syslog, "syslog", fake.syslog)
            observer = make_observer("info", fmt, twistd={"syslog": True, "prefix": "tp-test"})
            log = Logger(namespace="tunnelpass.client", observer=observer)
            log.debug("dropped")
            log.warn("cannot reach {server}: {reason}", server="192.0.2.1:10101", reason="refused",
                     event="connect_failed")
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("oops")
            self.assertEqual(fake.opened, ("tp-test", syslog.LOG_PID, syslog.LOG_DAEMON))
            priorities = [priority for priority, _ in fake.sent]
            self.assertEqual(priorities[0], 4)
            self.assertEqual(set(priorities[1:]), {2})
            if fmt == "text":
                self.assertEqual(fake.sent[0][1], "[tunnelpass.client] cannot reach 192.0.2.1:10101: refused")
                self.assertIn("[tunnelpass.client] | builtins.ZeroDivisionError: division by zero",
                              [line for _, line in fake.sent])
            else:
                self.assertEqual(len(fake.sent), 2)
                first = json.loads(fake.sent[0][1])
                self.assertEqual((first["event"], first["server"]), ("connect_failed", "192.0.2.1:10101"))
                self.assertIn("ZeroDivisionError", json.loads(fake.sent[1][1])["traceback"])


class SocketChatterTests(unittest.TestCase):
    """twisted.internet.udp announces each session socket it opens and
    closes (log.msg, info): below debug those lines are dropped."""

    def legacy(self, text):
        from twisted.logger import LogLevel as Level

        return {"log_namespace": "log_legacy", "log_level": Level.info, "message": (text,), "isError": 0,
                "system": "-", "log_format": "{log_text}", "log_text": text, "log_time": 0.0}

    def test_dropped_below_debug_only(self):
        chatter = ["tunnelpass-udp-session (UDP) starting on 40001", "(UDP Port 40001 Closed)"]
        for level, expected in (("info", ["kept"]), ("debug", chatter + ["kept"])):
            stream = io.StringIO()
            observer = make_observer(level, "text", stream)
            for text in chatter + ["kept"]:
                observer(self.legacy(text))
            lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
            self.assertEqual(lines, expected, level)


class SyslogInjectionTests(unittest.TestCase):
    """A peer's words inside a message (a certificate name, an error text)
    cannot start a syslog record of their own."""

    def test_line_breaks_in_a_message_stay_in_one_record(self):
        import syslog

        fake = FakeSyslog()
        self.patch(syslog, "openlog", fake.openlog)
        self.patch(syslog, "syslog", fake.syslog)
        observer = make_observer("info", "text", twistd={"syslog": True, "prefix": "tp-test"})
        log = Logger(namespace="tunnelpass.client", observer=observer)
        forged = "a.example\n2030-01-01 [tunnelpass.server] client 1.2.3.4 connected\r\x0b\u2028x"
        log.warn("certificate is for {names}", names=forged)
        self.assertEqual(len(fake.sent), 1, fake.sent)
        line = fake.sent[0][1]
        self.assertTrue(line.isprintable(), line)
        self.assertIn("a.example\\n2030-01-01", line)


class TraceTests(unittest.TestCase):
    """--log debug: accept, pool claim, dial and close of each connection."""

    def setUp(self):
        self.events = []
        self.patch(connlog, "log", Logger(namespace="tunnelpass.conn", observer=self.events.append))
        self.patch(connlog.TRACING, "enabled", True)
        self.reactor = MemoryReactorClock()
        self.factory = TCPForwardFactory(self.reactor, "127.0.0.1:1/tcp", "127.0.0.1", 9999,
                                         Limits(max_conns=10, connect_timeout=3, idle=60))

    def accept(self, factory=None):
        inbound = (factory or self.factory).buildProtocol(None)
        transport = RelayTransport(peerAddress=_Address("192.0.2.7", 40000))
        inbound.makeConnection(transport)
        return inbound, transport

    def connect_remote(self):
        _, _, client_factory, _, _ = self.reactor.tcpClients[-1]
        outbound = client_factory.buildProtocol(None)
        outbound.makeConnection(RelayTransport())
        return outbound

    def trace(self):
        return [{k: v for k, v in e.items() if not k.startswith("log_")} for e in self.events]

    def test_accept_dial_close_with_bytes_and_duration(self):
        inbound, _ = self.accept()
        self.reactor.advance(0.125)
        outbound = self.connect_remote()
        inbound.dataReceived(b"hello")
        outbound.dataReceived(b"world!")
        self.reactor.advance(1.0)
        inbound.readConnectionLost()
        inbound.writeConnectionLost()
        inbound.connectionLost(Failure(ConnectionDone()))
        accept, dial, close = self.trace()
        number = accept["conn"]
        self.assertEqual(accept, {"listener": "127.0.0.1:1/tcp", "conn": number, "peer": "192.0.2.7:40000",
                                  "user": None, "via": "", "event": "conn_accept"})
        self.assertEqual(dial, {"listener": "127.0.0.1:1/tcp", "conn": number, "target": "127.0.0.1:9999",
                                "connect_ms": 125.0, "event": "conn_dial"})
        self.assertEqual(close, {"listener": "127.0.0.1:1/tcp", "conn": number, "reason": "normal", "detail": None,
                                 "bytes_in": 5, "bytes_out": 6, "duration_ms": 1125.0, "target": "127.0.0.1:9999",
                                 "event": "conn_close"})
        self.assertEqual({e["log_level"] for e in self.events}, {LogLevel.debug})

    def test_close_reasons(self):
        reset, _ = self.accept()
        self.connect_remote()
        reset.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        idle, _ = self.accept()
        self.connect_remote()
        self.reactor.advance(61)
        idle.connectionLost(Failure(ConnectionLost()))
        refused, _ = self.accept()
        _, _, client_factory, _, _ = self.reactor.tcpClients[-1]
        client_factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        refused.connectionLost(Failure(ConnectionDone()))
        early, _ = self.accept()
        early.connectionLost(Failure(ConnectionDone()))
        closes = [(e["reason"], e["detail"]) for e in self.events if e["event"] == "conn_close"]
        self.assertEqual(closes[0][0], "reset")
        self.assertIn("Connection reset by peer", closes[0][1])
        self.assertEqual(closes[1][0], "timeout")
        self.assertEqual(closes[2][0], "refused")
        self.assertIn("refused", closes[2][1])
        self.assertEqual(closes[3], ("cancelled", None))
        (failed,) = [e for e in self.events if e["event"] == "conn_dial_failed"]
        self.assertEqual((failed["target"], failed["reason"]), ("127.0.0.1:9999", "refused"))

    def test_pool_claim_wait(self):
        clock = Clock()
        pool = IdlePool(clock, 10, lambda count: None)

        factory = PoolDialFactory(self.reactor, "target", "127.0.0.1", 8080, Limits(max_conns=10), clock=clock)
        factory.opener = PoolOpener(lambda: pool)
        inbound, _ = self.accept(factory)
        clock.advance(0.25)
        connection = PoolMember()
        pool.add(b"i" * 16, connection)
        self.assertIs(connection.protocol.inbound, inbound)
        accept, claim = self.trace()
        self.assertEqual(claim, {"listener": "target", "conn": accept["conn"], "wait_ms": 250.0,
                                 "event": "conn_pool_claim"})
        # No pool at all: the user is refused and the trace says why.
        pool = None
        refused, _ = self.accept(factory)
        refused.connectionLost(Failure(ConnectionDone()))
        close = self.trace()[-1]
        self.assertEqual((close["event"], close["reason"], close["detail"]), ("conn_close", "no_pool", "not connected"))

    def test_nothing_traced_unless_debug(self):
        self.patch(connlog.TRACING, "enabled", False)
        inbound, _ = self.accept()
        self.connect_remote()
        inbound.dataReceived(b"x")
        inbound.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.events, inbound.trace, inbound.bytes_in), ([], None, 1))

    def test_makeService_switches_tracing_with_the_level(self):
        from tunnelpass import tap

        self.patch(connlog.TRACING, "enabled", False)
        base = ["--mode", "server", "--tunnel", "127.0.0.1:10101", "--target", "127.0.0.1:8080",
                "--key", "e2e-tunnel-key-0123456789abcdef"]
        for level, expected in (("debug", True), ("info", False)):
            options = tap.Options()
            options.parseOptions([*base, "--log", level])
            tap.makeService(options, MemoryReactorClock())
            self.assertEqual(connlog.TRACING.enabled, expected)


class _Address:
    def __init__(self, host, port):
        self.host, self.port = host, port
