"""End to end: what an unauthenticated peer can (not) make a client do, the
client's --flow receive|send, SIGHUP on the client, and the pool after a
burst of users.  Real twistd processes; forging relays in test threads."""

from __future__ import annotations

import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import TCPServer, tcp_round_trip
from tests.e2e.tunnel_harness import ThreadedProxy, Tunnel, relay_bytes, throwaway_tls_server
from tunnelpass.wire.codec import Type, encode, encode_text

FORGED_TLS_REQUIRED = encode(Type.ERROR, encode_text(7, "this server requires TLS (level 2)"))


class ForgingRelay(ThreadedProxy):
    """On the path between a client and the real server: answers the first
    frame of chosen connections with a forged "TLS required (level 2)" --
    plain connections while *forge_plain*, and the first *forge_tls* TLS
    connections inside a TLS session it terminates with its own certificate
    (a client without a pin accepts it) -- and relays everything else."""

    def __init__(self, testcase, server_port: int, forge_plain: bool, forge_tls: int):
        self.forge_plain, self.forge_tls = forge_plain, forge_tls
        self.forged = {"plain": 0, "tls": 0}
        self.tls = throwaway_tls_server(testcase)
        super().__init__(testcase, server_port)

    def _forge(self, kind: str) -> bool:
        with self.lock:
            if kind == "plain" and self.forge_plain or kind == "tls" and self.forged["tls"] < self.forge_tls:
                self.forged[kind] += 1
                return True
            return False

    def _serve(self, downstream: socket.socket) -> None:
        try:
            downstream.settimeout(10)
            is_tls = downstream.recv(1, socket.MSG_PEEK) == b"\x16"
            if self._forge("tls" if is_tls else "plain"):
                if is_tls:
                    downstream = self.tls.wrap_socket(downstream, server_side=True)
                downstream.recv(4096)  # the HELLO
                downstream.sendall(FORGED_TLS_REQUIRED)
                if is_tls:
                    time.sleep(0.2)  # let the client read the record before the close
                    downstream.unwrap()
                downstream.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.server_port))
        except OSError:
            downstream.close()
            return
        downstream.settimeout(None)
        self.sockets.append(upstream)
        threading.Thread(target=relay_bytes, args=(upstream, downstream), daemon=True).start()
        relay_bytes(downstream, upstream)


class ForgedTLSLevelTests(unittest.TestCase):
    """Issue 9 item 1: a forged ERROR(7) used to switch a pinless client to
    level 2 for good; it never reached the real tls=1 server again."""

    def connect_through(self, forge_plain: bool, forge_tls: int) -> tuple[Tunnel, ForgingRelay]:
        tunnel = Tunnel(self, tls=1, connect=False)
        relay = ForgingRelay(self, tunnel.tunnel_port, forge_plain, forge_tls)
        started = time.monotonic()
        tunnel.start_client(tunnel_port=relay.port, ready=None)
        tunnel.client.wait_for_log("connected to", timeout=20)
        self.elapsed = time.monotonic() - started
        tunnel.wait_pool()
        return tunnel, relay

    def test_forged_answer_to_every_plain_hello(self):
        tunnel, relay = self.connect_through(forge_plain=True, forge_tls=0)
        self.assertGreaterEqual(relay.forged["plain"], 1)
        self.assertIn("tls 1, type 0)", tunnel.client.log())  # the connected line: (..., tls N, type N)
        self.assertEqual(b"ping" * 100, tcp_round_trip(tunnel.entry, b"ping" * 100))

    def test_forged_answer_inside_tls(self):
        tunnel, relay = self.connect_through(forge_plain=False, forge_tls=1)
        self.assertEqual(relay.forged["tls"], 1)
        self.assertIn("the server says it requires TLS level 2", tunnel.client.log(), "the forgery was read")
        self.assertEqual(b"pong", tcp_round_trip(tunnel.entry, b"pong"))

    def test_a_client_told_the_level_ignores_forgeries(self):
        tunnel = Tunnel(self, tls=1, connect=False)
        relay = ForgingRelay(self, tunnel.tunnel_port, forge_plain=True, forge_tls=0)
        tunnel.client_args = ["--tls", "1"]
        tunnel.start_client(tunnel_port=relay.port, ready=None)
        tunnel.client.wait_for_log("connected to", timeout=15)
        self.assertEqual(relay.forged["plain"], 0, "a client told tls=1 never speaks plain")


class ClientFlowAndSignalTests(unittest.TestCase):
    def test_client_refuses_the_other_flow(self):
        """A server holding the key announces the send flow; a client that
        insists on receive does not start listening on its --target."""
        backend = TCPServer(self)
        tunnel = Tunnel(self, flow="send", backend=backend, connect=False, client_args=["--flow", "receive"])
        tunnel.start_client(ready=None)
        tunnel.client.wait_for_log("insists on --flow receive")
        self.assertNotIn("connected to", tunnel.client.log())
        self.assertNotIn("send flow: listening", tunnel.client.log())
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", tunnel.entry), timeout=1).close()

    def test_client_follows_the_flow_it_insists_on(self):
        tunnel = Tunnel(self, flow="send", client_args=["--flow", "send"])
        self.assertEqual(b"same", tcp_round_trip(tunnel.entry, b"same"))

    def test_sighup_does_not_kill_the_client(self):
        tunnel = Tunnel(self, tls=2)
        tunnel.client.signal(signal.SIGHUP)
        tunnel.client.wait_for_log("SIGHUP: reloaded --ca")
        with open(tunnel.ca, "w") as f:
            f.write("not a certificate")
        tunnel.client.signal(signal.SIGHUP)
        tunnel.client.wait_for_log("--ca reload failed, keeping the current CA certificates")
        self.assertIsNone(tunnel.client.process.poll(), "SIGHUP used to end the client (exit 129)")
        self.assertEqual(b"still", tcp_round_trip(tunnel.entry, b"still"))
        plain = Tunnel(self)
        plain.client.signal(signal.SIGHUP)
        plain.client.wait_for_log("SIGHUP: nothing to reload")
        self.assertIsNone(plain.client.process.poll())


class PoolBurstTests(unittest.TestCase):
    def test_burst_of_64_users_leaves_a_bounded_pool(self):
        """Issue 9 item 5: 64 concurrent users used to take the client's pool
        target from 8 to 1,024 (doubling per shortage)."""
        tunnel = Tunnel(self, client_args=["--metrics", "tcp:0:interface=127.0.0.1", "--report-interval", "1s"])
        barrier = threading.Barrier(64)
        results = []

        def user():
            barrier.wait()
            results.append(tcp_round_trip(tunnel.entry, b"x" * 1000) == b"x" * 1000)

        threads = [threading.Thread(target=user) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(results.count(True), 64)
        peak = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, _health(tunnel.client.log(), "pool_target"), _health(tunnel.server.log(), "pool_idle"))
            time.sleep(0.2)
        self.assertLessEqual(peak, 2 * 64 + 8)
        self.assertGreater(peak, 8, "the pool did grow for the burst")


def _health(log: str, field: str) -> int:
    lines = [line for line in log.splitlines() if f"{field}=" in line]
    return int(lines[-1].split(f"{field}=")[1].split()[0]) if lines else 0
