"""End-to-end: --rate holds throughput near the limit (the issue asks for
within 10%), on both relay engines and through the tunnel."""

import socket
import time

from twisted.trial import unittest

from tests.e2e.harness import Forwarder, TCPServer, free_port
from tests.e2e.tunnel_harness import Tunnel, on_both_carriers

RATE_MBIT = 80  # 10 MB/s


def measured_rate(port: int, skip: int = 4 << 20, measure: int = 24 << 20) -> float:
    """Bytes/s read from a streaming backend, after the first *skip* bytes
    (socket buffers and the bucket's burst fill up there)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        received, started = 0, None
        while received < skip + measure:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise AssertionError("stream ended early")
            received += len(chunk)
            if started is None and received >= skip:
                started, mark = time.monotonic(), received
        return (received - mark) / (time.monotonic() - started)


class RateCheck:
    def check(self, port, mbit: int = RATE_MBIT, measure: int = 24 << 20):
        rate = measured_rate(port, measure=measure)
        limit = mbit * 1e6 / 8
        self.assertLess(abs(rate - limit) / limit, 0.10, f"{rate * 8 / 1e6:.1f} Mbit/s against {mbit}")


class RateTests(RateCheck, unittest.TestCase):
    def test_forwarder_splice(self):
        source, port = TCPServer(self, "source"), free_port()
        Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {source.port}\n", "--rate", str(RATE_MBIT))
        self.check(port)

    def test_forwarder_copy(self):
        source, port = TCPServer(self, "source"), free_port()
        Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {source.port}\n", "--rate", str(RATE_MBIT),
                  "--zero-copy", "off")
        self.check(port)


@on_both_carriers
class TunnelRateTests(RateCheck, unittest.TestCase):
    """--rate through the tunnel."""

    def test_tunnel_tls1(self):
        # Type 3 at half the rate: its Python HTTP/2 path, on a machine
        # loaded by the parallel suite, must not be what limits the figure.
        mbit = RATE_MBIT // 2 if self.carrier else RATE_MBIT
        tunnel = Tunnel(self, tls=1, backend=TCPServer(self, "source"),
                        server_args=["--rate", str(mbit)], carrier=self.carrier)
        self.check(tunnel.entry, mbit, measure=(12 << 20) if self.carrier else (24 << 20))


@on_both_carriers
class RateBackpressureTests(unittest.TestCase):
    def test_rate_keeps_backpressure_into_tls(self):
        """Uploads into a TLS pool connection (type 3: a stream of a TLS
        carrier) whose far end stopped reading: the rate timer must not
        resume the sender behind the consumer's back."""
        from tests.e2e.harness import rss_kib

        tunnel = Tunnel(self, tls=1, backend=TCPServer(self, "stall"), server_args=["--rate", "400"],
                        carrier=self.carrier)
        before = rss_kib(tunnel.server.process.pid)
        with socket.create_connection(("127.0.0.1", tunnel.entry), timeout=10) as s:
            s.setblocking(False)
            block, deadline = b"u" * 65536, time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    s.send(block)
                except BlockingIOError:
                    time.sleep(0.01)
            grown = rss_kib(tunnel.server.process.pid) - before
        self.assertLess(grown, 16 * 1024, f"server RSS grew by {grown} KiB")
