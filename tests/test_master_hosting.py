# -*- test-case-name: tests.test_master_hosting -*-
"""InstanceHost: many tunnel instances in one reactor, on loopback."""

from __future__ import annotations

import os
import secrets

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.e2e.harness import free_port
from tunnelpass.master.hosting import LOG_RATE, InstanceHost, _Instance
from tunnelpass.ops import connlog


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Exploding(Protocol):
    """A relay whose dataReceived raises: a bug inside one instance."""

    def __init__(self, factory):
        self.factory = factory

    def dataReceived(self, data):
        raise ZeroDivisionError("boom in an instance")


async def until(predicate, what: str, timeout: float = 8.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02)


async def round_trip(port: int, payload: bytes) -> bytes:
    done = Deferred()

    class User(Protocol):
        received = b""

        def connectionMade(self):
            self.transport.write(payload)

        def dataReceived(self, data):
            self.received += data
            if len(self.received) >= len(payload):
                self.transport.loseConnection()

        def connectionLost(self, reason):
            if not done.called:
                done.callback(self.received)

    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), User())
    done.addTimeout(8, reactor)
    return await done


class Hosting(TestCase):
    """A server and a client instance in one host, real sockets."""

    def setUp(self):
        self.events = []
        self.host = InstanceHost(reactor, lambda id, kind, data: self.events.append((id, kind, data)),
                                 report_interval=3600, fallback=lambda event: None)
        globalLogPublisher.addObserver(self.host)
        self.addCleanup(globalLogPublisher.removeObserver, self.host)
        self.addCleanup(self.host.stop_all, 1.0)
        echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        self.key = secrets.token_hex(16)
        self.tunnel, self.public = free_port(), free_port()
        self.server_url = f"server://{self.key}@127.0.0.1:{self.tunnel}/127.0.0.1:{self.public}?mode=1"
        self.client_url = f"client://{self.key}@127.0.0.1:{self.tunnel}/127.0.0.1:{echo.getHost().port}"
        self.dir = self.mktemp()

    def statuses(self, id):
        return [(data["status"], data["error"]) for who, kind, data in self.events if who == id and kind == "status"]

    def logs(self, id):
        return [data for who, kind, data in self.events if who == id and kind == "log"]

    async def start_pair(self, client_log: str = "info", server_log: str = "info"):
        self.host.start("srv00001", self.server_url, os.path.join(self.dir, "s"), server_log)
        self.host.start("cli00001", self.client_url, os.path.join(self.dir, "c"), client_log)
        self.assertEqual(self.statuses("srv00001"), [("running", "")])
        self.assertEqual(self.statuses("cli00001"), [("running", "")])
        server = self.host.instances["srv00001"].service
        await until(lambda: server.session is not None, "the client's session")
        return server

    async def test_bytes_flow_stats_and_stop(self):
        await self.start_pair()
        payload = os.urandom(50_000)
        self.assertEqual(await round_trip(self.public, payload), payload)
        self.host.report()
        stats = {who: data for who, kind, data in self.events if kind == "stats"}
        self.assertEqual((stats["srv00001"]["tcprx"], stats["srv00001"]["tcptx"]), (len(payload), len(payload)))
        self.assertEqual((stats["cli00001"]["tcprx"], stats["cli00001"]["tcptx"]), (len(payload), len(payload)))
        self.assertGreater(stats["cli00001"]["pool"], 0)
        self.assertEqual(set(stats["srv00001"]), {"tcps", "udps", "pool", "ping", "tcprx", "tcptx", "udprx",
                                                   "udptx"})
        self.assertEqual(await round_trip(self.public, b"last bytes"), b"last bytes")
        await self.host.stop("srv00001", 1.0)
        self.assertEqual(self.statuses("srv00001")[-1], ("stopped", ""))
        last_two = [(kind, data) for who, kind, data in self.events if who == "srv00001" and kind != "log"][-2:]
        self.assertEqual([kind for kind, _ in last_two], ["stats", "status"])
        self.assertEqual(last_two[0][1]["tcprx"], len(payload) + len(b"last bytes"), "the end of the run counts")
        self.assertNotIn("srv00001", self.host.instances)
        self.assertEqual(self.statuses("cli00001"), [("running", "")])
        # The port is free again: the same instance starts once more.
        self.host.start("srv00001", self.server_url, os.path.join(self.dir, "s"), "info")
        self.assertEqual(self.statuses("srv00001")[-1], ("running", ""))

    async def test_busy_port_is_that_instance_error(self):
        await self.start_pair()
        other = f"server://{self.key}@127.0.0.1:{self.tunnel}/127.0.0.1:{free_port()}"
        self.host.start("busy0001", other, os.path.join(self.dir, "b"), "info")
        [(status, error)] = self.statuses("busy0001")
        self.assertEqual(status, "error")
        self.assertIn(f"--tunnel: cannot listen on 127.0.0.1:{self.tunnel}", error)
        self.assertNotIn("busy0001", self.host.instances)
        payload = b"still running" * 100
        self.assertEqual(await round_trip(self.public, payload), payload)

    def test_bad_url_is_an_error_with_the_parser_message(self):
        self.host.start("bad00001", "server://127.0.0.1:1/127.0.0.1:99999", self.dir, "info")
        [(status, error)] = self.statuses("bad00001")
        self.assertEqual(status, "error")
        self.assertIn("99999", error)
        self.host.start("bad00002", "ftp://x", self.dir, "info")
        self.assertEqual(self.statuses("bad00002"), [("error", "the URL must start with server:// or client://")])

    async def test_exception_in_one_instance_leaves_the_others_running(self):
        server = await self.start_pair()
        factory = server.target_factory
        original = factory.buildProtocol
        factory.buildProtocol = lambda addr: Exploding(factory)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.public), _Sender(b"x"))
        await until(lambda: self.flushLoggedErrors(ZeroDivisionError), "the logged ZeroDivisionError")
        errors = [log for log in self.logs("srv00001") if "ZeroDivisionError" in log["text"]]
        self.assertTrue(errors, "the failure is attributed to the server instance")
        self.assertEqual(errors[0]["level"], "error")
        factory.buildProtocol = original
        self.assertEqual(self.statuses("srv00001"), [("running", "")])
        self.assertEqual(self.statuses("cli00001"), [("running", "")])
        payload = b"after the bug" * 100
        self.assertEqual(await round_trip(self.public, payload), payload)

    async def test_log_attribution_and_levels(self):
        self.addCleanup(setattr, connlog.TRACING, "enabled", connlog.TRACING.enabled)
        await self.start_pair(client_log="warn", server_log="debug")
        self.assertEqual(await round_trip(self.public, b"traced"), b"traced")
        server_lines = [log["text"] for log in self.logs("srv00001")]
        self.assertTrue(any(line.startswith("server running") for line in server_lines), server_lines)
        # Logged without a source (Twisted's own line, a module-level Logger): found on the stack.
        self.assertIn(f"_GateFactory starting on {self.tunnel}", server_lines)
        self.assertTrue(any(" accepted from 127.0.0.1:" in line for line in server_lines), server_lines)
        self.assertTrue(any("client 127.0.0.1 connected" in line for line in server_lines), server_lines)
        # The client logs at warn: its info lines ("client running", "connected to") stay out.
        self.assertEqual([log for log in self.logs("cli00001") if log["level"] == "info"], [])
        self.assertFalse(any("client running" in line for line in server_lines))

    async def test_a_refused_clients_handshake_lines_are_its_own(self):
        """The client's control protocol logs the server's refusal; that line
        reaches the client instance's log (found through the protocol's
        ``handler`` link, not only its first link)."""
        wrong = self.client_url.replace(self.key, "9f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5d")
        self.host.start("srv00001", self.server_url, os.path.join(self.dir, "s"), "info")
        self.host.start("cli00002", wrong, os.path.join(self.dir, "c"), "info")
        await until(lambda: any("peer refused" in log["text"] for log in self.logs("cli00002")),
                    "the client's refusal line")
        self.assertFalse(any("peer refused" in log["text"] for log in self.logs("srv00001")))

    def test_tls1_server_keeps_its_certificate_in_the_instance_dir(self):
        directory = os.path.join(self.dir, "instances", "tls00001")
        url = f"server://{self.key}@127.0.0.1:{self.tunnel}/127.0.0.1:{self.public}?tls=1&mode=1"
        self.host.start("tls00001", url, directory, "info")
        self.assertEqual(self.statuses("tls00001"), [("running", "")])
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        self.assertTrue(any(name.endswith(".crt") for name in os.listdir(directory)))


class _Sender(Protocol):
    def __init__(self, data):
        self.data = data

    def connectionMade(self):
        self.transport.write(self.data)


class _Owned:
    log = Logger(namespace="tests.owned")


class LogRouting(SynchronousTestCase):
    """The observer's filter, budget and fallback (synthetic events)."""

    def setUp(self):
        self.clock = Clock()
        self.events, self.unowned = [], []
        self.host = InstanceHost(self.clock, lambda *event: self.events.append(event), 60, clock=self.clock,
                                 fallback=self.unowned.append)
        self.owned = _Owned()
        instance = self.host.instances["abc"] = _Instance("abc", "info", self.clock)
        self.host._own(self.owned, instance)

    def emit(self, count: int = 1, level=LogLevel.info, source=None):
        for n in range(count):
            self.host({"log_level": level, "log_format": "line {n}", "n": n, "log_time": 1.0,
                       "log_source": self.owned if source is None else source, "log_namespace": "x"})

    def test_more_than_the_rate_is_suppressed_and_counted(self):
        self.emit(LOG_RATE + 50)
        self.assertEqual(len(self.events), LOG_RATE)
        self.clock.advance(1)
        self.emit(1)
        self.assertEqual(self.events[-2][2]["text"], "50 lines suppressed")
        self.assertEqual(self.events[-1][2]["text"], "line 0")

    def test_level_filter_and_fallback(self):
        self.emit(1, LogLevel.debug)
        self.assertEqual(self.events, [])
        self.emit(1, LogLevel.critical)
        self.assertEqual(self.events[0][2]["level"], "error")
        self.emit(1, source=object())
        self.assertEqual(len(self.unowned), 1)

    def test_fatal_lets_only_critical_through(self):
        self.host.instances["abc"].level = "fatal"
        self.emit(1, LogLevel.error)
        self.assertEqual(self.events, [])
        self.emit(1, LogLevel.critical)
        self.assertEqual([e[2]["level"] for e in self.events], ["error"])

    def test_linked_source_is_attributed(self):
        class Protocol_:
            factory = self.owned

        self.emit(1, source=Protocol_())
        self.assertEqual(self.events[0][0], "abc")
