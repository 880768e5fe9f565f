# -*- test-case-name: tests.test_master_supervisor -*-
"""The Supervisor: placement, events, deaths and stops, first against fake
processes (deterministic, with a Clock), then against real workers."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.e2e.harness import ROOT, free_port
from tests.test_master_hosting import Echo, round_trip, until
from tunnelpass.master.supervisor import REAP_GRACE, Supervisor
from tunnelpass.master.workerwire import CommandDecoder, encode
from tests.e2e.master_harness import can_bind


class FakeProcess:
    def __init__(self, reactor, protocol, pid):
        self.reactor, self.protocol, self.pid = reactor, protocol, pid
        self.commands = CommandDecoder()
        self.sent: list[dict] = []
        self.signals: list[str] = []
        self.stdin_closed = False

    def writeToChild(self, fd, data):
        assert fd == 0
        self.sent += self.commands.feed(data)

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        self.signals.append(name)

    def say(self, **event):
        self.protocol.childDataReceived(3, encode(event))

    def end(self, sig=None, status=None):
        self.protocol.processEnded(Failure(ProcessTerminated(status, sig)))


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.next_pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        assert childFDs == {0: "w", 1: "r", 2: "r", 3: "r"}
        assert args[1:3] == ["-m", "tunnelpass.master.worker"]
        self.next_pid += 1
        process = FakeProcess(self, protocol, self.next_pid)
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


class Unit(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.events = []
        self.supervisor = Supervisor(self.reactor, 2, "/state", 1.0, lambda *e: self.events.append(e),
                                     backoff=lambda attempt: 2.0 ** attempt)
        self.supervisor.startService()
        self.a, self.b = self.reactor.processes

    def statuses(self, id):
        return [(d["status"], d["error"]) for who, kind, d in self.events if who == id and kind == "status"]

    def test_least_loaded_placement_and_start_command(self):
        for n in range(4):
            self.supervisor.start_instance(f"i{n}", f"server://x{n}", "debug")
        self.assertEqual([c["id"] for c in self.a.sent], ["i0", "i2"])
        self.assertEqual([c["id"] for c in self.b.sent], ["i1", "i3"])
        self.assertEqual(self.a.sent[0], {"op": "start", "id": "i0", "url": "server://x0",
                                          "dir": "/state/instances/i0", "log": "debug"})
        self.assertEqual(self.supervisor.instance_pid("i1"), self.b.pid)
        self.assertEqual(self.supervisor.worker_pids(), [self.a.pid, self.b.pid])

    def test_events_reach_on_event(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.a.say(ev="hello", pid=self.a.pid)
        self.a.say(ev="status", id="i0", status="running", error="")
        self.a.say(ev="stats", id="i0", tcps=1, udps=0, pool=2, ping=0.5, tcprx=3, tcptx=4, udprx=0, udptx=0)
        self.a.say(ev="log", id="i0", level="info", text="hi", time=5.0)
        self.a.say(ev="log", id="other", level="info", text="not placed here", time=5.0)
        self.assertEqual(self.events, [
            ("i0", "status", {"status": "running", "error": ""}),
            ("i0", "stats", {"tcps": 1, "udps": 0, "pool": 2, "ping": 0.5, "tcprx": 3, "tcptx": 4, "udprx": 0,
                             "udptx": 0}),
            ("i0", "log", {"level": "info", "text": "hi", "time": 5.0}),
        ])

    def test_worker_death_errors_its_instances_and_respawns_with_backoff(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.supervisor.start_instance("i1", "u", "info")
        self.a.say(ev="status", id="i0", status="running", error="")
        self.b.say(ev="status", id="i1", status="running", error="")
        self.a.end(sig=9)
        self.assertEqual(self.statuses("i0")[-1], ("error", "worker exited: signal 9"))
        self.assertEqual(self.statuses("i1"), [("running", "")])
        self.assertEqual(self.supervisor.worker_pids(), [self.b.pid])
        self.reactor.advance(0.9)
        self.assertEqual(len(self.reactor.processes), 2)
        self.reactor.advance(0.2)  # backoff(0) = 1 s
        self.assertEqual(len(self.reactor.processes), 3)
        again = self.reactor.processes[2]
        again.end(status=1)
        self.reactor.advance(1.5)
        self.assertEqual(len(self.reactor.processes), 3, "the second respawn waits backoff(1) = 2 s")
        self.reactor.advance(0.6)
        self.assertEqual(len(self.reactor.processes), 4)

    def test_malformed_or_oversized_line_kills_the_worker(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.a.protocol.childDataReceived(3, b'{"ev":"status","id":"i0","status":"running","error":""}\n{"ev":')
        self.assertEqual(self.a.signals, [])
        self.a.protocol.childDataReceived(3, b'"nonsense"}\n')
        self.assertEqual(self.a.signals, ["KILL"])
        self.b.protocol.childDataReceived(3, b"x" * 70000)
        self.assertEqual(self.b.signals, ["KILL"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stray_output_is_logged_not_parsed(self):
        self.a.protocol.childDataReceived(1, b"a print\n{not json\n")
        self.a.protocol.childDataReceived(2, b"x" * 70000 + b"\n")
        self.assertEqual(self.a.signals, [])

    def test_silence_is_an_error(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.a.say(ev="status", id="i0", status="running", error="")
        for _ in range(2):
            self.reactor.advance(1.0)
            self.a.say(ev="stats", id="i0", tcps=0, udps=0, pool=0, ping=0, tcprx=0, tcptx=0, udprx=0, udptx=0)
        self.reactor.advance(2.0)
        self.assertEqual(self.statuses("i0"), [("running", "")])
        self.reactor.advance(1.0)
        self.assertEqual(self.statuses("i0"), [("running", ""), ("error", "no report for 3 s")])
        self.reactor.advance(5.0)
        self.assertEqual(len(self.statuses("i0")), 2, "reported once")
        self.a.say(ev="stats", id="i0", tcps=0, udps=0, pool=0, ping=0, tcprx=0, tcptx=0, udprx=0, udptx=0)
        self.assertEqual(self.statuses("i0")[-1], ("running", ""))

    def test_stop_fires_on_stopped(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.a.say(ev="status", id="i0", status="running", error="")
        d = self.supervisor.stop_instance("i0", 2.0)
        self.assertEqual(self.a.sent[-1], {"op": "stop", "id": "i0", "timeout": 2.0})
        self.assertNoResult(d)
        self.a.say(ev="status", id="i0", status="stopped", error="")
        self.successResultOf(d)
        self.assertIsNone(self.supervisor.instance_pid("i0"))
        self.successResultOf(self.supervisor.stop_instance("i0", 2.0))  # not running: at once

    def test_a_stop_nobody_asked_for_is_an_error(self):
        """A worker that stops an instance on its own (someone sent it
        SIGTERM): the registry must see an error, so restart=true applies."""
        self.supervisor.start_instance("i0", "u", "info")
        self.a.say(ev="status", id="i0", status="running", error="")
        self.a.say(ev="status", id="i0", status="stopped", error="")
        self.assertEqual(self.statuses("i0")[-1], ("error", "stopped by its worker, not by the master"))
        self.assertIsNone(self.supervisor.instance_pid("i0"))

    def test_stop_overdue_kills_the_worker(self):
        self.supervisor.start_instance("i0", "u", "info")
        d = self.supervisor.stop_instance("i0", 2.0)
        self.reactor.advance(2.0 + REAP_GRACE - 0.1)
        self.assertEqual(self.a.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.a.signals, ["KILL"])
        self.assertNoResult(d)
        self.a.end(sig=9)
        self.successResultOf(d)
        self.assertEqual(self.statuses("i0"), [("stopped", "")])

    def test_queued_while_no_worker_is_up(self):
        self.a.end(sig=9)
        self.b.end(sig=9)
        self.supervisor.start_instance("q", "u", "info")
        self.reactor.advance(1.0)
        self.assertEqual([c["id"] for p in self.reactor.processes[2:] for c in p.sent], ["q"])

    def test_stop_service_stops_instances_then_closes_stdin_then_kills(self):
        self.supervisor.start_instance("i0", "u", "info")
        self.a.say(ev="status", id="i0", status="running", error="")
        d = self.supervisor.stopService()
        self.assertEqual(self.a.sent[-1]["op"], "stop")
        self.assertFalse(self.a.stdin_closed)
        self.a.say(ev="status", id="i0", status="stopped", error="")
        self.assertTrue(self.a.stdin_closed and self.b.stdin_closed)
        self.a.end(status=0)
        self.reactor.advance(REAP_GRACE)
        self.assertEqual(self.b.signals, ["KILL"])
        self.b.end(sig=9)
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.processes), 2, "no respawn once stopping")


class RealWorkers(TestCase):
    """Two real worker processes on loopback."""

    def setUp(self):
        self.events = []
        self.supervisor = Supervisor(reactor, 2, self.mktemp(), 0.5, lambda *e: self.events.append(e),
                                     backoff=lambda attempt: 0.1, shutdown_timeout=1.0)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)
        self.key = secrets.token_hex(16)

    def status(self, id):
        found = [d for who, kind, d in self.events if who == id and kind == "status"]
        return found[-1]["status"] if found else None

    async def test_spread_kill_respawn_and_stop(self):
        ports = {}
        for n in range(4):
            ports[f"srv{n:05d}"] = tunnel, public = free_port(), free_port()
            self.supervisor.start_instance(
                f"srv{n:05d}", f"server://{self.key}@127.0.0.1:{tunnel}/127.0.0.1:{public}?mode=1", "info")
        await until(lambda: all(self.status(id) == "running" for id in ports), "4 instances running")
        pids = {id: self.supervisor.instance_pid(id) for id in ports}
        self.assertEqual(len(set(pids.values())), 2, "spread over both workers")
        await until(lambda: {who for who, kind, _ in self.events if kind == "stats"} == set(ports), "stats")
        victim = pids["srv00000"]
        survivors = [id for id in ports if pids[id] != victim]
        before = len(self.events)
        os.kill(victim, signal.SIGKILL)
        lost = [id for id in ports if pids[id] == victim]
        await until(lambda: all(self.status(id) == "error" for id in lost), "error for the lost instances")
        for id in lost:
            error = [d for who, kind, d in self.events if who == id and kind == "status"][-1]["error"]
            self.assertEqual(error, "worker exited: signal 9")
        self.assertEqual([e for e in self.events[before:] if e[0] in survivors and e[1] == "status"], [])
        await until(lambda: len(self.supervisor.worker_pids()) == 2, "a respawned worker")
        self.assertNotIn(victim, self.supervisor.worker_pids())
        # The lost instances' ports are free: start one again (the registry's job).
        tunnel, public = ports[lost[0]]
        await until(lambda: can_bind(tunnel), "the dead worker's port released")
        self.supervisor.start_instance(lost[0], f"server://{self.key}@127.0.0.1:{tunnel}/127.0.0.1:{public}"
                                                "?mode=1", "info")
        await until(lambda: self.status(lost[0]) == "running", "the instance back")
        await self.supervisor.stop_instance(survivors[0], 1.0)
        self.assertEqual(self.status(survivors[0]), "stopped")
        self.assertTrue(can_bind(ports[survivors[0]][0]))

    async def test_stop_drains_live_connections(self):
        echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        tunnel, public = free_port(), free_port()
        self.supervisor.start_instance("srv00001", f"server://{self.key}@127.0.0.1:{tunnel}/127.0.0.1:{public}"
                                                   "?mode=1", "info")
        self.supervisor.start_instance("cli00001", f"client://{self.key}@127.0.0.1:{tunnel}/127.0.0.1:"
                                                   f"{echo.getHost().port}", "info")
        await until(lambda: self.status("srv00001") == self.status("cli00001") == "running", "both running")
        await until(lambda: any(who == "srv00001" and kind == "stats" and data["pool"] > 0
                                for who, kind, data in self.events), "the client's pool at the server")
        self.assertEqual(await round_trip(public, b"warm up"), b"warm up")
        user = _User()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", public), user)
        self.assertEqual(await user.exchange(b"before the stop"), b"before the stop")
        stopped = self.supervisor.stop_instance("srv00001", 8.0)
        await until(lambda: not _can_connect(public), "the listener closed")
        self.assertFalse(stopped.called)
        self.assertEqual(await user.exchange(b"during the drain"), b"during the drain")
        self.assertFalse(stopped.called)
        user.transport.loseConnection()
        await stopped
        self.assertEqual(self.status("srv00001"), "stopped")
        self.assertEqual(self.status("cli00001"), "running")


class MasterKilled(SynchronousTestCase):
    def test_sigkill_of_the_master_leaves_no_worker_and_frees_the_port(self):
        tunnel, public = free_port(), free_port()
        url = f"server://{secrets.token_hex(16)}@127.0.0.1:{tunnel}/127.0.0.1:{public}?mode=1"
        script = textwrap.dedent(f"""
            import json, sys
            from twisted.internet import reactor
            from tunnelpass.master.supervisor import Supervisor
            def on_event(id, kind, data):
                if kind == "status" and data["status"] == "running":
                    print(json.dumps(supervisor.worker_pids()), flush=True)
            supervisor = Supervisor(reactor, 1, {self.mktemp()!r}, 1.0, on_event)
            supervisor.startService()
            supervisor.start_instance("solo0001", {url!r}, "info")
            reactor.run()
        """)
        master = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)
        self.addCleanup(master.stdout.close)
        try:
            [worker] = json.loads(master.stdout.readline() or "[0]")
            self.assertTrue(worker)
            self.assertTrue(_can_connect(tunnel))
        finally:
            master.kill()
            master.wait()
        _wait(lambda: not _alive(worker), "the worker to die with its master")
        _wait(lambda: can_bind(tunnel) and can_bind(public), "the ports released")


class _User(Protocol):
    def __init__(self):
        self.waiting = None
        self.buffer = b""
        self.expected = 0

    def exchange(self, data: bytes) -> Deferred:
        self.waiting, self.buffer, self.expected = Deferred(), b"", len(data)
        self.transport.write(data)
        return self.waiting.addTimeout(8, reactor)

    def dataReceived(self, data):
        self.buffer += data
        if self.waiting is not None and len(self.buffer) >= self.expected:
            waiting, self.waiting = self.waiting, None
            waiting.callback(self.buffer)


def _can_connect(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, what: str, timeout: float = 8.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class WorkerSignals(SynchronousTestCase):
    def test_sigterm_stops_every_instance_then_exits_0(self):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        # bash, not sh: dash redirects one-digit fds only (under trial -j the pipe is fd 10+).
        worker = subprocess.Popen(
            ["bash", "-c", f'exec "$0" -m tunnelpass.master.worker --report-interval 0.2 3>&{write}',
             sys.executable], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(write,), cwd=ROOT)
        os.close(write)
        self.addCleanup(lambda: worker.poll() is None and (worker.kill(), worker.wait()))
        self.addCleanup(worker.stdin.close)
        events = _Events(read)
        self.assertEqual(events.next()["ev"], "hello")
        tunnels = [free_port() for _ in range(2)]
        for n, tunnel in enumerate(tunnels):
            url = f"server://{secrets.token_hex(16)}@127.0.0.1:{tunnel}/127.0.0.1:{free_port()}?mode=1"
            worker.stdin.write(encode({"op": "start", "id": f"i{n}", "url": url, "dir": self.mktemp(),
                                       "log": "warn"}))
        worker.stdin.flush()
        running = {e["id"] for e in events.until(2, lambda e: e.get("status") == "running")}
        self.assertEqual(running, {"i0", "i1"})
        worker.send_signal(signal.SIGTERM)
        stopped = {e["id"] for e in events.until(2, lambda e: e.get("status") == "stopped")}
        self.assertEqual(stopped, {"i0", "i1"})
        self.assertEqual(worker.wait(8), 0)
        self.assertTrue(all(can_bind(port) for port in tunnels))


class _Events:
    """Reads a worker's fd 3 (blocking, with a deadline)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def next(self, timeout: float = 8.0) -> dict:
        import select

        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            data = os.read(self.fd, 65536) if ready else b""
            if not data:
                raise AssertionError(f"no event within {timeout} s (or the pipe closed)")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def until(self, count: int, predicate) -> list[dict]:
        found = []
        while len(found) < count:
            event = self.next()
            if predicate(event):
                found.append(event)
        return found


class WorkerChatter(SynchronousTestCase):
    def test_socket_chatter_stays_out_unless_debug(self):
        from twisted.logger import PredicateResult

        from tunnelpass.master.worker import socket_chatter

        lines = [("(TCP Port 20211 Closed)", PredicateResult.no), ("(UDP Port 1 Closed)", PredicateResult.no),
                 ("_GateFactory starting on 20210", PredicateResult.no),
                 ("Unhandled Error", PredicateResult.maybe)]
        for text, verdict in lines:
            event = {"log_namespace": "log_legacy", "message": (text,)}
            self.assertEqual(socket_chatter("info")(event), verdict, text)
            self.assertEqual(socket_chatter("debug")(event), PredicateResult.maybe)
