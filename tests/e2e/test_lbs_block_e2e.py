"""--lbs and --block through real tunnels (issue 10, item 4).

Two tunnels, one per test, each used for several checks:

* send flow: the server dials a group [slow, fast] with ``--lbs 1``; the
  client's listener (where users connect) has ``--block 2``.
* receive flow: the client dials [primary, backup] with ``--lbs 2``; the
  server's public listener has ``--block 3``.

Backends name themselves in a banner line (they speak first, as SMTP does)
and then echo, so each user sees which target served it.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import subprocess
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import _EchoHandler, _ThreadingTCP, free_port, wait_until
from tests.e2e.tunnel_harness import Tunnel, on_both_carriers


def banner_backend(testcase, name: bytes, port: int = 0):
    """A backend that sends ``name\\n`` on accept, then echoes."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                self.request.sendall(name + b"\n")
                _EchoHandler.handle(self)
            except OSError:
                pass

    server = _ThreadingTCP(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def close():
        server.shutdown()
        server.server_close()

    testcase.addCleanup(close)
    return server, close


def slow_backend(testcase) -> int:
    """A listener whose accept queue (backlog 0) is kept full: a new
    connection's SYN is dropped and only gets in on a retransmission, 1-2 s
    later (TCP connect latency on loopback cannot be slowed otherwise)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()

    def drain():
        while not stop.wait(1.5):
            try:
                conn, _ = listener.accept()
                conn.sendall(b"slow\n")
                conn.close()
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()

    def close():
        stop.set()
        filler.close()
        listener.close()

    testcase.addCleanup(close)
    return port


def banner_and_echo(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> tuple[bytes, bytes, float]:
    """Connect, read the banner line without sending anything first, then
    send *payload* and read its echo: (banner, echo, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise AssertionError(f"closed after {data!r}")
            data += chunk
        s.sendall(payload)
        echo = b""
        while len(echo) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            echo += chunk
    return data.strip(), echo, time.monotonic() - started


def refused(port: int, payload: bytes) -> bool:
    """Whether a connection that starts with *payload* is closed without a
    byte back (reset or EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


@on_both_carriers
class LoadBalancingAndBlockTests(unittest.TestCase):
    def test_lowest_latency_and_block_http(self):
        if self.carrier:
            raise unittest.SkipTest("the latency probe and --block run before any stream: nothing carrier-specific "
                                    "(failover through type 3: test_primary_backup_and_block_tls)")
        fast, _ = banner_backend(self, b"fast")
        fast_port = fast.server_address[1]
        slow_port = slow_backend(self)
        group = f"127.0.0.1:{slow_port},127.0.0.1:{fast_port}"
        tunnel = Tunnel(self, flow="send",
                        server_args=["--target", group, "--lbs", "1", "--report-interval", "3s"],
                        client_args=["--block", "2", "--report-interval", "1s"], carrier=self.carrier)
        tunnel.server.wait_for_log(f"lowest latency target is now 127.0.0.1:{fast_port}")
        # lbs=1: every user goes to the fast target (round robin would send
        # every second one to the slow target, 1-2 s to connect).
        for _ in range(4):
            banner, echo, seconds = banner_and_echo(tunnel.entry)
            self.assertEqual((banner, echo), (b"fast", b"ping"))
            self.assertLess(seconds, 0.9, "never the slow target")
        # block=2: an HTTP client is refused at the client's listener...
        curl = subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{tunnel.entry}/"],
                              capture_output=True, text=True)
        self.assertIn(curl.returncode, (52, 56), curl.stderr)  # empty reply / reset
        tunnel.client.wait_for_log("started as http")
        # ... while other first bytes (raw binary, a TLS record) pass, and
        # the server-first banner came through above.
        for first in (b"\x00\x01\x02raw", b"\x16\x03\x01\x00\x10\x01"):
            with socket.create_connection(("127.0.0.1", tunnel.entry), timeout=5) as s:
                s.sendall(first)
                data = b""
                while len(data) < len(b"fast\n") + len(first):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    data += chunk
            self.assertEqual(data, b"fast\n" + first)
        tunnel.client.wait_for_log(" blocked=1 ")  # the health line's counter

    def test_primary_backup_and_block_tls(self):
        primary_port = free_port()
        _, stop_primary = banner_backend(self, b"primary", primary_port)
        backup, _ = banner_backend(self, b"backup")
        group = f"127.0.0.1:{primary_port},127.0.0.1:{backup.server_address[1]}"
        tunnel = Tunnel(self, flow="receive", server_args=["--block", "3"],
                        client_args=["--target", group, "--lbs", "2", "--fallback-interval", "1s",
                                     "--report-interval", "1s"], carrier=self.carrier)
        for _ in range(3):  # the primary only, while it works (round robin would alternate)
            self.assertEqual(banner_and_echo(tunnel.entry)[:2], (b"primary", b"ping"))
        # block=3: a TLS ClientHello is refused at the server's listener ...
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", tunnel.entry), timeout=5) as raw:
            with self.assertRaises((ssl.SSLError, ConnectionResetError, OSError)):
                context.wrap_socket(raw, server_hostname="localhost")
        tunnel.server.wait_for_log("started as tls")
        # ... and an HTTP request passes.
        self.assertFalse(refused(tunnel.entry, b"GET / HTTP/1.1\r\n\r\n"))
        # lbs=2: the primary dies -> the backup; it returns -> back to it
        # after the fallback interval, once a probe reaches it.
        stop_primary()
        self.assertEqual(banner_and_echo(tunnel.entry)[0], b"backup")
        tunnel.client.wait_for_log("using backup")
        self.assertEqual(banner_and_echo(tunnel.entry)[0], b"backup", "stays on the backup")
        banner_backend(self, b"primary", primary_port)
        wait_until(lambda: banner_and_echo(tunnel.entry)[0] == b"primary", 10, interval=0.2,
                   what="failback to the primary")
        tunnel.client.wait_for_log("is back; failing back")
