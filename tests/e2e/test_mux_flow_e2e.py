"""End to end: flow control of the HTTP/2 multiplexed carrier (``--type 3``,
``--tls 1``) with real twistd processes and sockets.

One user reads its stream at about 1 KiB/s while its backend tries to push
50 MiB at it; three other users move data at full speed through the same
tunnel (the same carrier connections).  The fast streams must finish, with
every byte checked, while the slow one is still stalled; and neither tunnel
process may buffer what the slow reader does not take.

The memory bound: each process may hold, for the slow stream, one stream
window (256 KiB, not acknowledged while its user is paused) on the
receiving side and HIGH_WATER (64 KiB) plus a read or two on the sending
side before the backend's socket stops being read; the fast streams add
their own windows and the allocator's slack.  Growth under 20 MiB in each
process therefore leaves a wide margin above the few MiB flow control
allows, and is well below the 50 MiB a tunnel without it would take in.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import ThreadedListener, can_connect, rss_kib, wait_until
from tests.e2e.tunnel_harness import Tunnel

MiB = 1024 * 1024
SLOW_TOTAL = 50 * MiB  # what the slow stream's backend tries to push
FAST_STREAMS = 3
FAST_TOTAL = 8 * MiB  # per fast stream, each way
RSS_GROWTH_BOUND_KIB = 20 * 1024


def pattern(offset: int, size: int) -> bytes:
    """The slow stream's bytes from *offset* (any slice can be checked)."""
    return bytes((offset + i) % 251 for i in range(size))


class Backend:
    """Behind the tunnel: a connection whose first byte is ``S`` gets the
    slow stream's 50 MiB (counting what the kernel took), ``E`` an echo."""

    def __init__(self, testcase):
        self.pushed = 0  # bytes of the slow stream the backend managed to send
        self.closed = threading.Event()
        testcase.addCleanup(self.closed.set)  # runs after the listener's close (cleanups run last first)
        self.port = ThreadedListener(testcase, self._serve, backlog=16).port

    def _serve(self, sock):
        with sock:
            try:
                first = sock.recv(1)
                if first == b"S":
                    self._push(sock)
                elif first == b"E":
                    while data := sock.recv(256 * 1024):
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _push(self, sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        block = pattern(0, 251 * 256)  # 64 KiB minus a little, a whole number of periods
        while self.pushed < SLOW_TOTAL and not self.closed.is_set():
            sock.sendall(block)
            self.pushed += len(block)


class FastUser(threading.Thread):
    """Sends FAST_TOTAL random bytes through the echo and checks they all come back."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.ok = False
        self.error: BaseException | None = None
        self.seconds = None

    def run(self):
        try:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port), timeout=15) as sock:
                sock.sendall(b"E")
                sent = hashlib.sha256()
                block = os.urandom(MiB)

                def write():
                    for _ in range(FAST_TOTAL // MiB):
                        sock.sendall(block)
                        sent.update(block)
                    sock.shutdown(socket.SHUT_WR)

                writer = threading.Thread(target=write, daemon=True)
                writer.start()
                received, count = hashlib.sha256(), 0
                while data := sock.recv(256 * 1024):
                    received.update(data)
                    count += len(data)
                writer.join(15)
            self.seconds = time.monotonic() - start
            self.ok = count == FAST_TOTAL and received.digest() == sent.digest()
            if not self.ok:
                self.error = AssertionError(f"{count} of {FAST_TOTAL} bytes came back, or not the same ones")
        except BaseException as e:  # noqa: B036 -- reported by the test
            self.error = e


class SlowUser(threading.Thread):
    """Reads its stream at about 1 KiB/s (256 bytes every 0.25 s), checking each byte."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # no autotuned megabytes
        self.sock.settimeout(15)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"S")
        self.read = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                data = self.sock.recv(256)
                if not data:
                    raise ConnectionError("the slow stream ended")
                if data != pattern(self.read, len(data)):
                    raise ValueError(f"corrupt slow stream at offset {self.read}")
                self.read += len(data)
                self.stop.wait(0.25)
        except BaseException as e:  # noqa: B036 -- reported by the test
            self.error = e
        finally:
            self.sock.close()


def carriers_up(server, at_least: int) -> bool:
    lines = [line for line in server.log().splitlines() if "carriers=" in line]
    return bool(lines) and int(lines[-1].split("carriers=")[1].split()[0]) >= at_least


class MuxFlowControlTests(unittest.TestCase):
    def test_a_slow_reader_stalls_only_its_own_stream(self):
        started = time.monotonic()
        backend = Backend(self)
        tunnel = Tunnel(self, flow="receive", tls=1, server_args=["--type", "3"], connect=False,
                        backend=backend)
        tunnel.start_client(ready=None)
        tunnel.client.wait_for_log("connected to")
        wait_until(lambda: carriers_up(tunnel.server, 2), 10, what="two carrier connections")
        wait_until(lambda: can_connect(tunnel.entry), 10, what="the tunnel entry port")
        pids = {"server": tunnel.server.process.pid, "client": tunnel.client.process.pid}
        baseline = {name: rss_kib(pid) for name, pid in pids.items()}

        slow = SlowUser(tunnel.entry)
        slow.start()
        self.addCleanup(slow.stop.set)
        # the backend pushes until flow control stops it: wait for it to stall
        last = [-1, time.monotonic()]

        def stalled():
            if backend.pushed != last[0]:
                last[:] = [backend.pushed, time.monotonic()]
                return False
            return backend.pushed > 0 and time.monotonic() - last[1] > 1.0
        wait_until(stalled, 8, interval=0.05, what="the slow stream's backend to stall")

        fast = [FastUser(tunnel.entry) for _ in range(FAST_STREAMS)]
        for user in fast:
            user.start()
        for user in fast:
            user.join(15)
        for user in fast:
            self.assertIsNone(user.error, f"a fast stream failed: {user.error!r}")
            self.assertTrue(user.ok)
        # the slow one is still stalled, and intact
        self.assertTrue(slow.is_alive(), f"the slow stream ended: {slow.error!r}")
        self.assertIsNone(slow.error)
        pushed_before = backend.pushed
        time.sleep(0.5)
        self.assertLess(backend.pushed - pushed_before, 512 * 1024, "the slow stream's sender was not held back")
        self.assertLess(backend.pushed, SLOW_TOTAL // 2)
        growth = {name: rss_kib(pid) - baseline[name] for name, pid in pids.items()}
        for name, kib in growth.items():
            self.assertLess(kib, RSS_GROWTH_BOUND_KIB, f"{name} RSS grew by {kib} KiB")
        print(f"\n  slow stream: backend pushed {backend.pushed / MiB:.1f} MiB of {SLOW_TOTAL // MiB}, "
              f"reader took {slow.read} B; fast streams {FAST_STREAMS} x {FAST_TOTAL // MiB} MiB each way in "
              f"{', '.join(f'{u.seconds:.2f}' for u in fast)} s; RSS growth server {growth['server']} KiB, "
              f"client {growth['client']} KiB; wall {time.monotonic() - started:.1f} s")
        slow.stop.set()
        slow.join(2)
