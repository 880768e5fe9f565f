"""Logs from real twistd processes: twistd's --logfile and daemon mode keep
tunnelpass's format and level, and --log debug traces each connection
(forwarder, and both sides of a tunnel)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from twisted.trial import unittest

from tests.e2e.harness import TWISTD, TCPServer, free_port, tcp_round_trip, wait_until
from tests.e2e.tunnel_harness import Tunnel, on_both_carriers


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def one_event(found: list[dict], name: str, **fields) -> dict:
    matches = [e for e in found if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]
    if len(matches) != 1:
        raise AssertionError(f"{len(matches)} {name} events with {fields} in:\n" + "\n".join(map(str, found)))
    return matches[0]


def wait_event(text, name: str, **fields) -> None:
    """Wait until *text()* (a log) has the event *name* with *fields*."""
    def seen():
        return any(e.get("event") == name and all(e.get(k) == v for k, v in fields.items()) for e in events(text()))

    try:
        wait_until(seen, 10, what=f"{name} {fields}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{text()}") from None


class LogDestinationTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.echo = TCPServer(self)
        self.port, self.dead = free_port(), free_port()
        self.rules = os.path.join(self.dir, "rules.conf")
        with open(self.rules, "w") as f:
            f.write(f"127.0.0.1:{self.port} | 127.0.0.1 | {self.echo.port}\n"
                    f"127.0.0.1:{self.dead} | 127.0.0.1 | {free_port()}\n")

    def twistd(self, *twistd_args: str, log_args=()) -> subprocess.Popen:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNELPASS_", "NP_"))}
        stdout = open(os.path.join(self.dir, "stdout"), "wb")
        self.addCleanup(stdout.close)
        process = subprocess.Popen([TWISTD, *twistd_args, "tunnelpass", "--mode", "forward", "--config", self.rules,
                                    *log_args], cwd=self.dir, stdout=stdout, stderr=subprocess.STDOUT,
                                   env=environment)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        return process

    def wait_log(self, path: str, text: str, timeout: float = 15.0) -> None:
        try:
            wait_until(lambda: text in read(path), timeout, what=repr(text))
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {path} ---\n{read(path)}\n--- stdout ---\n"
                                 f"{read(os.path.join(self.dir, 'stdout'))}") from None

    def test_logfile_gets_json_and_a_debug_trace_of_each_connection(self):
        """-n --logfile X: every line goes to X (none to stdout), as JSON, at
        debug level: the accept, dial and close of each connection."""
        log = os.path.join(self.dir, "forward.log")
        self.twistd("-n", "--pidfile=", "--logfile", log, log_args=("--log", "debug", "--log-format", "json"))
        self.wait_log(log, "forwarder running")
        self.assertEqual(tcp_round_trip(self.port, b"hello"), b"hello")
        with socket.create_connection(("127.0.0.1", self.dead), timeout=5) as s:
            self.assertEqual(s.recv(10), b"")  # its remote refused: closed
        wait_event(lambda: read(log), "conn_close", listener=f"127.0.0.1:{self.dead}/tcp")
        wait_event(lambda: read(log), "conn_close", listener=f"127.0.0.1:{self.port}/tcp")
        found = events(read(log))
        self.assertEqual([line for line in read(log).splitlines() if not line.startswith("{")], [])
        listener = f"127.0.0.1:{self.port}/tcp"
        accept = one_event(found, "conn_accept", listener=listener)
        conn = accept["conn"]
        self.assertTrue(accept["peer"].startswith("127.0.0.1:"))
        dial = one_event(found, "conn_dial", conn=conn)
        self.assertEqual((dial["level"], dial["logger"], dial["target"]),
                         ("debug", "tunnelpass.conn", f"127.0.0.1:{self.echo.port}"))
        self.assertGreaterEqual(dial["connect_ms"], 0)
        close = one_event(found, "conn_close", conn=conn)
        self.assertEqual((close["reason"], close["bytes_in"], close["bytes_out"]), ("normal", 5, 5))
        self.assertGreaterEqual(close["duration_ms"], dial["connect_ms"])
        refused = one_event(found, "conn_close", listener=f"127.0.0.1:{self.dead}/tcp")
        self.assertEqual((refused["reason"], refused["bytes_in"], refused["bytes_out"]), ("refused", 0, 0))
        self.assertEqual(read(os.path.join(self.dir, "stdout")), "")

    def test_daemon_logs_to_its_logfile_and_stops_on_sigterm(self):
        """Without -n twistd forks into the background; the daemon's log goes
        to --logfile in tunnelpass's format (it used to be lost)."""
        log, pidfile = os.path.join(self.dir, "daemon.log"), os.path.join(self.dir, "daemon.pid")
        launcher = self.twistd("--pidfile", pidfile, "--logfile", log, log_args=("--report-interval", "0"))
        self.assertEqual(launcher.wait(15), 0)  # the foreground process exits once the daemon runs
        self.addCleanup(_kill_from_pidfile, pidfile)  # whatever fails below, the daemon goes
        self.wait_log(log, "forwarder running")
        pid = int(read(pidfile))
        self.assertEqual(tcp_round_trip(self.port, b"daemon"), b"daemon")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(pidfile), 15, what="the daemon to exit and remove its pid file")
        text = read(log)
        self.assertIn("forwarder running", text)
        self.assertRegex(text, r"stats .*accepted=1 .*bytes_in=6 bytes_out=6 .*\(final\)")
        self.assertNotIn("listening on", read(os.path.join(self.dir, "stdout")))


    def test_daemon_that_cannot_start_tells_its_launcher(self):
        """A daemon whose start fails after the fork (a port in use) makes
        the launching twistd exit 1 with the line, and removes its pid file;
        twistd's launcher would otherwise wait on its status pipe forever."""
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", self.port))
        blocker.listen()
        log, pidfile = os.path.join(self.dir, "daemon.log"), os.path.join(self.dir, "daemon.pid")
        launcher = self.twistd("--pidfile", pidfile, "--logfile", log)
        self.addCleanup(_kill_from_pidfile, pidfile)
        self.assertEqual(launcher.wait(15), 1)
        said = read(os.path.join(self.dir, "stdout"))
        self.assertIn(f"tunnelpass: cannot listen on 127.0.0.1:{self.port}/tcp: Address already in use", said)
        self.assertIn("cannot listen on", read(log))
        wait_until(lambda: not os.path.exists(pidfile), 5, what="the pid file to go")


@on_both_carriers
class TunnelTraceTests(unittest.TestCase):
    def test_both_sides_trace_a_connection(self):
        """Receive flow at --log debug: the server logs the user's accept, its
        pool claim and close; the client the pool connection's accept (with
        the user's address), its target dial and close."""
        debug = ["--log", "debug", "--log-format", "json"]
        tunnel = Tunnel(self, server_args=debug, client_args=debug, carrier=self.carrier)
        user = socket.create_connection(("127.0.0.1", tunnel.entry), timeout=5)
        user_address = "127.0.0.1:%d" % user.getsockname()[1]
        user.sendall(b"traced")
        self.assertEqual(user.recv(100), b"traced")
        user.close()
        wait_event(tunnel.client.log, "conn_close", bytes_in=6)
        server = events(tunnel.server.log())
        accept = one_event(server, "conn_accept", peer=user_address)
        wait_event(tunnel.server.log, "conn_close", conn=accept["conn"])
        server, client = events(tunnel.server.log()), events(tunnel.client.log())
        claim = one_event(server, "conn_pool_claim", conn=accept["conn"])
        self.assertGreaterEqual(claim["wait_ms"], 0)
        close = one_event(server, "conn_close", conn=accept["conn"])
        self.assertEqual((close["reason"], close["bytes_in"], close["bytes_out"]), ("normal", 6, 6))
        accept = one_event(client, "conn_accept", user=user_address)
        dial = one_event(client, "conn_dial", conn=accept["conn"])
        self.assertEqual(dial["target"], f"127.0.0.1:{tunnel.backend.port}")
        close = one_event(client, "conn_close", conn=accept["conn"])
        self.assertEqual((close["reason"], close["bytes_in"], close["bytes_out"]), ("normal", 6, 6))


def _kill_from_pidfile(pidfile: str) -> None:
    try:
        pid = int(read(pidfile))
    except (OSError, ValueError):
        return
    _kill_quietly(pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
