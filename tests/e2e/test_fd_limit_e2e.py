"""End-to-end: processes with few file descriptors.

Both ends of a tunnel under ``prlimit --nofile=1024:1024`` (a common
service default) serve 500 concurrent users -- each costs two descriptors
on each side, so the idle pool must leave them room -- at tls 0 and 1 with
no refusal; and a forwarder that really runs out says so: a warning, the
``fd_exhausted`` counter, every lost connection counted as refused.
"""

from __future__ import annotations

import resource
import selectors
import shutil
import socket
import time

from twisted.trial import unittest

from tests.e2e.harness import load_test, Forwarder, TCPServer, free_port, scrape, wait_until
from tests.e2e.tunnel_harness import Tunnel

USERS = 500


def _limit(n: int) -> tuple:
    return ("prlimit", f"--nofile={n}:{n}")


def total(samples: dict, name: str) -> float:
    """The sum of metric *name* over all its label sets."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def concurrent_echoes(port: int, count: int, timeout: float = 30.0) -> int:
    """Open *count* connections at once, send a distinct line on each, read
    every echo (all sockets at once, with selectors); return how many came
    back whole.  A served user hangs up, as a burst of real users does.  A
    reset or an early EOF counts as a failure, not an error."""
    sockets, expected, received = [], {}, {}
    selector = selectors.DefaultSelector()
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            sockets.append(s)
        for i, s in enumerate(sockets):
            expected[s] = b"user %d of %d\n" % (i, count)
            try:
                s.sendall(expected[s])
            except OSError:
                continue
            s.setblocking(False)
            received[s] = b""
            selector.register(s, selectors.EVENT_READ)
        ok = 0
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                received[s] += data
                if not data or len(received[s]) >= len(expected[s]):
                    selector.unregister(s)
                    ok += received[s] == expected[s]
                    s.close()
        return ok
    finally:
        selector.close()
        for s in sockets:
            s.close()


def _interesting(samples: dict) -> dict:
    """The counters that say why users were not served."""
    keep = ("refused", "connect_failures", "fd_", "pool_", "handshake", "accepted")
    return {f"{name}{dict(labels) if labels else ''}": value for (name, labels), value in samples.items()
            if any(k in name for k in keep) and value}


@load_test
class FdLimitTests(unittest.TestCase):
    def setUp(self):
        if shutil.which("prlimit") is None:
            raise unittest.SkipTest("prlimit (util-linux) is not installed")
        # The test process holds every user's socket and the backend's end.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4 * USERS:
            if hard != resource.RLIM_INFINITY and hard < 4 * USERS:
                raise unittest.SkipTest(f"this test needs {4 * USERS} open files, the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (4 * USERS, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    def check_users(self, tls: int) -> None:
        server_metrics, client_metrics = free_port(), free_port()
        tunnel = Tunnel(self, tls=tls, prefix=_limit(1024),
                        server_args=["--metrics", f"tcp:{server_metrics}:interface=127.0.0.1"],
                        client_args=["--metrics", f"tcp:{client_metrics}:interface=127.0.0.1"])
        def diagnosis():
            counters = "\n".join(f"{name}: {name_value}" for name, port in
                                 (("server", server_metrics), ("client", client_metrics))
                                 for name_value in sorted(_interesting(scrape(port)).items()))
            return (f"\n{counters}\nserver log:\n{tunnel.server.log()[-4000:]}"
                    f"\nclient log:\n{tunnel.client.log()[-4000:]}")

        self.assertEqual(concurrent_echoes(tunnel.entry, USERS), USERS, diagnosis())
        # A second burst, once the pool has grown after the first.
        self.assertEqual(concurrent_echoes(tunnel.entry, USERS), USERS, diagnosis())
        for name, port in (("server", server_metrics), ("client", client_metrics)):
            samples = scrape(port)
            self.assertEqual(samples[("tunnelpass_fd_limit", ())], 1024, name)
            self.assertEqual(total(samples, "tunnelpass_connections_refused_total"), 0, name)
            self.assertEqual(total(samples, "tunnelpass_fd_exhausted_total"), 0, name)
            self.assertLessEqual(samples[("tunnelpass_pool_fd_bound", ())], 256, name)
        for process in (tunnel.server, tunnel.client):
            self.assertNotIn("EMFILE", process.log())
            self.assertNotIn("out of file descriptors", process.log())
        self.assertIn("idle pool bounded to 256 connections", tunnel.server.log())

    def test_500_users_tls0(self):
        self.check_users(0)

    def test_500_users_tls1(self):
        self.check_users(1)

    def test_running_out_is_warned_counted_and_refused(self):
        """A forwarder that may open 64 files and 100 connections held open
        at once: it serves what it can and says what it had to refuse."""
        echo = TCPServer(self)
        port, metrics = free_port(), free_port()
        forwarder = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {echo.port}\n",
                              "--metrics", f"tcp:{metrics}:interface=127.0.0.1", prefix=_limit(64))
        served = concurrent_echoes(port, 100, timeout=10)
        self.assertGreater(served, 0)
        self.assertLess(served, 100)
        labels = (("listener", f"127.0.0.1:{port}/tcp"), ("remote", f"127.0.0.1:{echo.port}"))
        samples = wait_until(lambda: (s := scrape(metrics))[("tunnelpass_connections_refused_total", labels)]
                             and s, 10, what="refusals in /metrics")
        self.assertGreater(total(samples, "tunnelpass_fd_exhausted_total"), 0)
        self.assertEqual(samples[("tunnelpass_fd_limit", ())], 64)
        self.assertEqual(samples[("tunnelpass_connections_refused_total", labels)], 100 - served)
        forwarder.wait_for_log("out of file descriptors")
        log = forwarder.log()
        self.assertIn("LimitNOFILE", log)
        self.assertNotIn("EMFILE encountered", log, "Twisted's per-connection lines are not needed")
