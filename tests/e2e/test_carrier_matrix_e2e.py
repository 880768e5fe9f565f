"""End-to-end: every carrier x TLS level x flow, from one parametrised matrix.

For each of carrier type {0 (TCP pool), 3 (HTTP/2 multiplexed)} x --tls
{0, 1, 2} x flow {receive, send} one test class runs one server and one
client ``twistd`` process and checks through them, in one test method (trial
has no setUpClass; one method shares the processes):

* TCP: a few concurrent checksummed streams, 100 connections at once,
  half-close both ways (the user's FIN and the target's FIN each leave the
  other direction open), an abnormal end of either leg reaching the other as
  a reset while a clean FIN stays a FIN;
* UDP: datagrams of several sizes both ways, from two user sockets.

A few cells start their processes from a URL or the server's token instead
of flags (as the old flow matrix did), so those forms run on both carriers.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import ThreadedListener, UDPEchoServer, free_port, wait_until
from tests.e2e.tunnel_harness import CARRIERS, Tunnel

#: Cells that start from a URL or a token (the rest from flags).
FORMS = {("receive", 1): "url", ("send", 0): "url", ("send", 1): "token"}

STREAMS, STREAM_BYTES = 4, 2 << 20


def reset(sock: socket.socket) -> None:
    """Close *sock* with an RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> tuple[str, bytes]:
    """Read until the stream ends: ``("eof" | "reset" | "timeout", bytes read)``."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return "eof", b"".join(chunks)
            chunks.append(data)
    except ConnectionResetError:
        return "reset", b"".join(chunks)
    except socket.timeout:
        return "timeout", b"".join(chunks)


class CommandBackend:
    """The target: TCP and UDP on one loopback port.  UDP echoes; a TCP
    connection's first byte says what it does:

    ``E`` echo until EOF, then FIN.  ``H`` read until EOF, then answer how
    many bytes came (the user's half-close leaves the way back open).
    ``G`` send ``bye`` and FIN at once, then read until EOF and record what
    came after its own FIN (the target's half-close leaves the way in open).
    ``R`` send 64 KiB, then reset.  ``S`` read until the stream ends and
    record how it ended (``eof`` or ``reset``) with the byte count.
    """

    def __init__(self, testcase):
        self.port = free_port()
        self.udp = UDPEchoServer(testcase, self.port)
        self.ends: dict[bytes, list] = {b"G": [], b"S": []}
        self.sunk = 0
        ThreadedListener(testcase, self._serve, port=self.port, backlog=256)

    def _drain(self, sock: socket.socket, count_into: str | None = None) -> tuple[str, int]:
        count = 0
        try:
            while data := sock.recv(1 << 18):
                count += len(data)
                if count_into:
                    setattr(self, count_into, getattr(self, count_into) + len(data))
        except ConnectionResetError:
            return "reset", count
        return "eof", count

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        try:
            command = sock.recv(1)
            if command == b"E":
                while data := sock.recv(1 << 18):
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            elif command == b"H":
                _, count = self._drain(sock)
                sock.sendall(b"got %d" % count)
                sock.shutdown(socket.SHUT_WR)
            elif command == b"G":
                sock.sendall(b"bye")
                sock.shutdown(socket.SHUT_WR)
                self.ends[b"G"].append(self._drain(sock))
            elif command == b"R":
                sock.sendall(os.urandom(64 << 10))
                time.sleep(0.2)
                reset(sock)
                return
            elif command == b"S":
                self.ends[b"S"].append(self._drain(sock, "sunk"))
        except OSError:
            pass
        finally:
            sock.close()


def echo_checksum(port: int, size: int) -> tuple[str, str, int]:
    """Send *size* random bytes through the ``E`` echo, half-close, read all back."""
    sent, received, count = hashlib.sha256(), hashlib.sha256(), [0]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"E")

        def reader():
            while data := s.recv(1 << 20):
                received.update(data)
                count[0] += len(data)

        thread = threading.Thread(target=reader)
        thread.start()
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            sent.update(block)
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        thread.join(60)
    return sent.hexdigest(), received.hexdigest(), count[0]


def concurrent_round_trips(port: int, count: int = 200) -> int:
    """Open *count* connections at once, then echo a distinct message on each."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(count)]
    ok = 0
    try:
        for i, s in enumerate(sockets):
            s.sendall(b"Econnection %d\n" % i)
        for i, s in enumerate(sockets):
            expected, data = b"connection %d\n" % i, b""
            while len(data) < len(expected) and (chunk := s.recv(100)):
                data += chunk
            ok += data == expected
    finally:
        for s in sockets:
            s.close()
    return ok


class CarrierMatrix:
    """One cell of the matrix; the generated classes below set the three axes."""

    carrier: int
    tls: int
    flow: str

    def test_tcp_and_udp(self):
        backend = CommandBackend(self)
        tunnel = Tunnel(self, flow=self.flow, tls=self.tls, backend=backend, carrier=self.carrier,
                        form=FORMS.get((self.flow, self.tls), "flags"))
        self.entry = tunnel.entry
        self.check_streams()
        self.check_half_close(backend)
        self.check_abnormal_ends(backend)
        self.check_datagrams()
        for process in (tunnel.server, tunnel.client):
            for bad in ("Traceback", "Unhandled"):
                self.assertNotIn(bad, process.log())

    def check_streams(self):
        results = [None] * STREAMS

        def one(i):
            results[i] = echo_checksum(self.entry, STREAM_BYTES)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        for sent, received, count in results:
            self.assertEqual((received, count), (sent, STREAM_BYTES), "a stream arrived altered")
        self.assertEqual(concurrent_round_trips(self.entry, 100), 100)

    def check_half_close(self, backend):
        # The user's FIN: the target reads to the end, then answers.
        with socket.create_connection(("127.0.0.1", self.entry), timeout=10) as user:
            user.sendall(b"H" + b"x" * 100_000)
            user.shutdown(socket.SHUT_WR)
            self.assertEqual(read_to_end(user), ("eof", b"got 100000"))
        # The target's FIN: the user reads it, then still sends.
        with socket.create_connection(("127.0.0.1", self.entry), timeout=10) as user:
            user.sendall(b"G")
            self.assertEqual(read_to_end(user), ("eof", b"bye"))
            user.sendall(b"after your FIN" * 1000)
            user.shutdown(socket.SHUT_WR)
            wait_until(lambda: backend.ends[b"G"], 10, what="the target to see the user's late bytes end")
        self.assertEqual(backend.ends[b"G"], [("eof", 14_000)])

    def check_abnormal_ends(self, backend):
        # The target resets: the user sees a reset, not an EOF.
        with socket.create_connection(("127.0.0.1", self.entry), timeout=10) as user:
            user.sendall(b"R")
            outcome, data = read_to_end(user)
        self.assertEqual(outcome, "reset", f"the user saw {outcome} after {len(data)} bytes")
        self.assertLessEqual(len(data), 64 << 10)
        # The user resets: the target sees a reset.
        user = socket.create_connection(("127.0.0.1", self.entry), timeout=10)
        user.sendall(b"S" + b"u" * 100_000)
        wait_until(lambda: backend.sunk >= 100_000, 10, what="bytes at the target")
        reset(user)
        wait_until(lambda: backend.ends[b"S"], 10, what="the target to see the reset")
        self.assertEqual(backend.ends[b"S"], [("reset", 100_000)])

    def check_datagrams(self):
        users = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.settimeout(10)
            s.bind(("127.0.0.1", 0))
            self.addCleanup(s.close)
            users.append(s)
        for size in (1, 1400, 60_000, 65_507, 0):
            for s in users:
                payload = os.urandom(size)
                s.sendto(payload, ("127.0.0.1", self.entry))
                self.assertEqual(s.recvfrom(65535)[0], payload, f"a {size}-byte datagram")


def _cells():
    for carrier in CARRIERS:
        for tls in (0, 1, 2):
            for flow in ("receive", "send"):
                name = f"Type{carrier}Tls{tls}{flow.capitalize()}Tests"
                doc = f"--type {carrier}, --tls {tls}, {flow} flow."
                yield name, type(name, (CarrierMatrix, unittest.TestCase),
                                 {"carrier": carrier, "tls": tls, "flow": flow, "__doc__": doc,
                                  "__module__": __name__, "__qualname__": name})


globals().update(_cells())
