"""End-to-end: `make demo` (python -m tunnelpass.demo) works as README.rst says."""

import os
import signal
import socket
import subprocess
import sys
import urllib.request

from twisted.trial import unittest

from tests.e2e.harness import ROOT, tcp_round_trip, udp_round_trip, wait_until

DEMO_PORTS = (8080, 8007, 18081, 18007, 10101)


def port_busy(port):
    """Whether the demo could not bind *port* (it binds as Twisted does, with
    SO_REUSEADDR, so connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class DemoTests(unittest.TestCase):
    def run_demo(self, *args, ready: str):
        # The demos bind fixed ports: one at a time across trial's workers.
        import fcntl
        import tempfile

        lock = open(os.path.join(tempfile.gettempdir(), "tunnelpass-demo-ports.lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        self.addCleanup(lock.close)  # closing releases the lock, after the demo's own cleanup
        busy = [p for p in DEMO_PORTS if port_busy(p)]
        if busy:
            raise unittest.SkipTest(f"demo ports in use: {busy}")
        log_path = os.path.abspath(self.mktemp())
        with open(log_path, "wb") as log:
            # Ctrl-C must reach the demo even when this suite itself was
            # started in the background (which ignores SIGINT, and children
            # inherit that): Twisted then installs no SIGINT handler.
            demo = subprocess.Popen([sys.executable, "-m", "tunnelpass.demo", *args], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(lambda: demo.poll() is None and demo.kill())

        def read_log():
            with open(log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")

        wait_until(lambda: ready in read_log() or demo.poll() is not None, 30, what="demo")
        self.assertIn(ready, read_log())
        return demo, read_log

    def test_tunnel_demo_serves_http_through_the_tunnel(self):
        demo, read_log = self.run_demo(ready="curl http://127.0.0.1:8080/")
        self.assertIn("tls 1, type 0, certificate sha256:", read_log())
        page = urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5).read()
        self.assertIn(b"Hello from the tunnelpass demo service", page)
        demo.send_signal(signal.SIGINT)
        self.assertEqual(demo.wait(30), 0, read_log())
        self.assertIn("[server]", read_log())
        self.assertIn("[client]", read_log())

    def test_forward_demo_forwards_http_tcp_and_udp(self):
        demo, read_log = self.run_demo("--forward", ready="forwarder running")
        wait_until(lambda: "curl http://127.0.0.1:8080/" in read_log(), 10, what="the demo's instructions")
        self.assertIn("forwarder running: 3 listener(s)", read_log())
        page = urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5).read()
        self.assertIn(b"Hello from the tunnelpass demo service", page)
        self.assertEqual(tcp_round_trip(8007, b"demo tcp"), b"demo tcp")
        self.assertEqual(udp_round_trip(8007, b"demo udp"), b"demo udp")
        demo.send_signal(signal.SIGINT)
        self.assertEqual(demo.wait(20), 0, read_log())
        self.assertIn("forwarder stopped", read_log())
