"""End to end: ``--dial`` (source address of target dials) and ``--dns``
(the target name cache), with real ``twistd`` processes.

One tunnel (server + client); the client dials a target group of a name and
an IP literal, both on 127.0.0.3, from ``--dial 127.0.0.2``.  The targets
answer with the peer address they see.  The name is served by a DNS
responder in this process, which the client's system resolver (glibc,
through ``reactor.nameResolver``) is pointed at by a private
``/etc/resolv.conf``: the processes run under ``unshare --mount`` with a
file bind-mounted over it, so nothing outside them changes.  That needs
root (port 53, mount); the test is skipped otherwise, and the cache itself
is unit-tested in tests/test_namecache.py with an injected resolver.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time

from twisted.names import dns
from twisted.trial import unittest

from tests.e2e.harness import TWISTD, free_port, tcp_round_trip, wait_until
from tests.e2e.tunnel_harness import KEY, Tunnel

NAME = "e1.tunnelpass.test"
TTL = 2.0


def _can_use_private_resolv_conf() -> str | None:
    """Why the test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a DNS responder on port 53, a private mount namespace)"
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --bind /dev/null /etc/resolv.conf"],
                           capture_output=True)
    return None if probe.returncode == 0 else "cannot bind-mount in a private mount namespace"


class DNSResponder:
    """Answers ``NAME A`` with 127.0.0.3 (``AAAA``: no data) over UDP port
    53 of a random loopback address; records when each A query came."""

    def __init__(self, testcase):
        self.a_queries: list[float] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            self.host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
            try:
                self.sock.bind((self.host, 53))
                break
            except OSError:
                continue
        else:
            raise OSError("no loopback address with port 53 free")
        testcase.addCleanup(self.sock.close)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.Message()
            try:
                query.fromStr(data)
            except Exception:
                continue
            answer = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=1, auth=1)
            answer.queries = query.queries
            for q in query.queries:
                name = q.name.name.decode().rstrip(".").lower()
                if name != NAME:
                    answer.rCode = dns.ENAME
                elif q.type == dns.A:
                    self.a_queries.append(time.monotonic())
                    answer.answers.append(dns.RRHeader(q.name.name, dns.A, ttl=60, auth=True,
                                                       payload=dns.Record_A("127.0.0.3", ttl=60)))
            self.sock.sendto(answer.toStr(), peer)


class Recorder:
    """A target on 127.0.0.3:PORT (TCP and UDP) that answers each
    connection / datagram with the address it came from."""

    def __init__(self, testcase):
        self.port = free_port()
        self.tcp_peers: list[str] = []
        self.udp_peers: list[str] = []
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.3", self.port))
        self.tcp.listen(64)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.3", self.port))
        for sock in (self.tcp, self.udp):
            testcase.addCleanup(sock.close)
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._datagrams, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            self.tcp_peers.append(peer[0])
            with conn:
                try:
                    conn.sendall(peer[0].encode())
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass

    def _datagrams(self) -> None:
        while True:
            try:
                _, peer = self.udp.recvfrom(65535)
                self.udp_peers.append(peer[0])
                self.udp.sendto(peer[0].encode(), peer)
            except OSError:
                return


def udp_exchange(port: int, deadline: float = 5.0) -> bytes:
    """A new UDP session through the tunnel: send (again every 0.5 s, UDP
    may lose the first) until a reply comes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            s.sendto(b"who am i", ("127.0.0.1", port))
            try:
                return s.recvfrom(65535)[0]
            except socket.timeout:
                continue
    raise AssertionError("no UDP reply through the tunnel")


class DialDnsTests(unittest.TestCase):
    def test_dial_source_and_name_cache(self):
        # Startup errors, each its own short-lived process, run meanwhile.
        refused = {
            "not local": ["--dial", "192.0.2.1", "--target", "127.0.0.3:9"],
            "family": ["--dial", "127.0.0.2", "--target", "[::1]:9"],
        }
        checks = {what: subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "client", "--tunnel", "127.0.0.1:9",
             "--key", KEY, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.mktemp_dir())
            for what, args in refused.items()}

        why = _can_use_private_resolv_conf()
        if why is None:
            responder = DNSResponder(self)
            resolv_conf = os.path.join(self.mktemp_dir(), "resolv.conf")
            with open(resolv_conf, "w") as f:
                f.write(f"nameserver {responder.host}\noptions attempts:2 timeout:1\n")
            named, literal = Recorder(self), Recorder(self)
            targets = f"{NAME}:{named.port},127.0.0.3:{literal.port}"
            prefix = ("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                      resolv_conf)

            class Targets(Tunnel):
                client_target = targets

            tunnel = Targets(self, backend=named, prefix=prefix,
                             client_args=["--dial", "127.0.0.2", "--dns", f"{TTL:g}s"])

            # TCP connections and UDP sessions alternate between the name
            # and the literal; every one leaves from 127.0.0.2.
            tcp = [tcp_round_trip(tunnel.entry, b"x") for _ in range(4)]
            udp = [udp_exchange(tunnel.entry) for _ in range(2)]
            self.assertEqual(tcp + udp, [b"127.0.0.2"] * 6, tunnel.client.log())
            self.assertGreaterEqual(min(len(named.tcp_peers), len(literal.tcp_peers)), 2)
            self.assertTrue(named.udp_peers and literal.udp_peers)

            # The name is looked up again once the TTL is over, never before.
            wait_until(lambda: tcp_round_trip(tunnel.entry, b"x") and len(responder.a_queries) >= 2,
                       TTL + 8, interval=0.2, what="a second lookup after the TTL")
            queries = list(responder.a_queries)
            uses = len(named.tcp_peers) + len(named.udp_peers)
            self.assertGreaterEqual(uses, 2 * len(queries), "most uses of the name come from the cache")
            self.assertGreaterEqual(min(b - a for a, b in zip(queries, queries[1:])), TTL - 0.05, queries)
            peers = named.tcp_peers + literal.tcp_peers + named.udp_peers + literal.udp_peers
            self.assertEqual(set(peers), {"127.0.0.2"})

        outputs = {}
        for what, process in checks.items():
            outputs[what] = output = process.communicate(timeout=30)[0].decode()
            self.assertNotEqual(process.returncode, 0, output)
            self.assertEqual(len(output.strip().splitlines()), 1, output)
        self.assertIn("--dial: 192.0.2.1 is not an address of this host", outputs["not local"])
        self.assertIn("--dial 127.0.0.2 is IPv4 but target [::1]:9 is IPv6", outputs["family"])
        if why is not None:
            raise unittest.SkipTest(f"--dial/--dns through a real resolver: {why} (startup errors checked)")

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path
