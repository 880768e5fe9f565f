"""End-to-end: the handshake guard against the issue's two admission attacks,
on a real ``twistd`` server and client.

* A flood of silent sockets from 127.0.0.2-9 (140 each, under the
  per-address cap) keeps the 1,024-slot global cap full, re-opening
  whatever the server drops, while users go through the tunnel and the
  client refills its pool from 127.0.0.1.
* Five wrong keys from the client's own address (127.0.0.1, as from a
  neighbour behind the same NAT) while the client's session is live.
"""

from __future__ import annotations

import resource
import selectors
import socket
import struct
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import load_test, free_port, scrape, tcp_round_trip, wait_until
from tests.e2e.tunnel_harness import Tunnel
from tunnelpass.wire.codec import FrameDecoder, Type, decode_text
from tunnelpass.wire.handshake import AUTH_FAILED, ClientHandshake

TRY_LATER = 8  # ERROR code: control connection turned away (docs/protocol.rst)


class Flood(threading.Thread):
    """*per_source* silent connections from each of *sources* to *port*.

    As an attacker would: a connection the server drops after holding it
    (a time-out, an eviction) is re-opened at once, so a slot freed by a
    wave of time-outs is taken back within milliseconds; one refused at
    once is re-tried after *retry* seconds (not in a busy loop: the machine
    is shared)."""

    def __init__(self, port: int, sources: list[str], per_source: int, retry: float = 0.1):
        super().__init__(daemon=True)
        self.port, self.sources, self.per_source, self.retry = port, sources, per_source, retry
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.opened = 0
        self.dropped = 0
        self.error: BaseException | None = None

    def _open(self, source: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.selector.register(sock, selectors.EVENT_READ, (source, time.monotonic()))
        self.opened += 1

    def run(self) -> None:
        try:
            for _ in range(self.per_source):
                for source in self.sources:
                    self._open(source)
            later: list[tuple[float, str]] = []
            while not self.stopping.is_set():
                for key, _ in self.selector.select(0.01):
                    try:
                        if key.fileobj.recv(4096):
                            continue  # the server never speaks first; ignore
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.dropped += 1
                    source, opened = key.data
                    now = time.monotonic()
                    if now - opened < self.retry:
                        later.append((now + self.retry, source))
                    else:
                        self._open(source)
                now = time.monotonic()
                due = [source for when, source in later if when <= now]
                later = [(when, source) for when, source in later if when > now]
                for source in due:
                    self._open(source)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.join(10)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def user_load(port: int, seconds: float, interval: float = 0.05) -> tuple[int, int]:
    """One user connection every *interval* for *seconds*, each echoing a
    distinct message through the tunnel: (served, started)."""
    results: list[bool] = []

    def one(i: int) -> None:
        message = b"user %d\n" % i
        try:
            results.append(tcp_round_trip(port, message, timeout=10) == message)
        except OSError:
            results.append(False)

    threads = []
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        thread = threading.Thread(target=one, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
        i += 1
        time.sleep(max(0.0, start + i * interval - time.monotonic()))
    for thread in threads:
        thread.join(15)
    return sum(results), len(threads)


def try_key(port: int, key: bytes) -> int | str:
    """A control handshake from 127.0.0.1 with *key*: the ERROR code the
    server answered, "welcome", or how the connection ended without one."""
    client = ClientHandshake(key, b"")
    decoder = FrameDecoder()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(client.start())
            while True:
                data = s.recv(4096)
                if not data:
                    return "closed"
                for frame in decoder.feed(data):
                    if frame.type is Type.ERROR:
                        return decode_text(frame.payload)[0]
                    if frame.type is Type.WELCOME:
                        return "welcome"
                    for reply in client.receive(frame):
                        s.sendall(reply)
        except ConnectionResetError:
            return "reset"


def metric(port: int, name: str, labels: tuple = ()) -> float:
    return scrape(port)[(name, labels)]


@load_test
class AdmissionTests(unittest.TestCase):
    def test_flood_from_eight_addresses_does_not_starve_the_client(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            raise unittest.SkipTest(f"needs 2,048 file descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        metrics = free_port()
        # A handshake deadline longer than the test: the flood's sockets are
        # never timed out, so the cap stays full by their holding alone.
        tunnel = Tunnel(self, server_args=["--metrics", f"tcp:{metrics}:interface=127.0.0.1",
                                           "--handshake-timeout", "30s"])
        flood = Flood(tunnel.tunnel_port, [f"127.0.0.{i}" for i in range(2, 10)], 140)
        flood.start()
        self.addCleanup(flood.stop)
        wait_until(lambda: metric(metrics, "tunnelpass_handshakes_pending") >= 1024, 10,
                   what="the flood to fill the global cap")
        self.assertIsNone(flood.error)
        samples, load_done = [], threading.Event()

        def sample():  # how full the cap is while the users come
            while not load_done.wait(0.25):
                samples.append(metric(metrics, "tunnelpass_handshakes_pending"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        served, started = user_load(tunnel.entry, 5.0)
        load_done.set()
        sampler.join(5)
        full = sum(1 for value in samples if value >= 1000)
        evictions = metric(metrics, "tunnelpass_handshake_evictions_total")
        refused = metric(metrics, "tunnelpass_handshake_refused_total", (("reason", "global_cap"),))
        flood.stop()
        self.assertIsNone(flood.error)
        print(f"\nflood: {flood.opened} opened, {flood.dropped} dropped; users served {served}/{started}; "
              f"pending >= 1000 in {full} of {len(samples)} samples (min {min(samples):.0f}); "
              f"evictions {evictions:.0f}, refused (global cap) {refused:.0f}")
        self.assertGreaterEqual(full, 0.9 * len(samples), "the flood kept the cap full")
        self.assertGreater(refused, 0, "the flood kept knocking")
        self.assertGreater(evictions, 0, "the client's pool connections took the flooders' slots")
        self.assertGreaterEqual(served, 0.95 * started, f"only {served} of {started} users served")

    def test_wrong_keys_from_the_clients_address_do_not_stop_its_session(self):
        metrics = free_port()
        tunnel = Tunnel(self, server_args=["--metrics", f"tcp:{metrics}:interface=127.0.0.1"])
        outcomes = [try_key(tunnel.tunnel_port, b"not the key 0123456789abcdef") for _ in range(6)]
        served, started = user_load(tunnel.entry, 2.0)  # 40 users: 5 times the idle pool
        print(f"\nafter 5 wrong keys from the client's address: users served {served}/{started}")
        self.assertEqual(served, started)
        self.assertEqual(outcomes, [AUTH_FAILED] * 5 + [TRY_LATER])
        self.assertEqual(metric(metrics, "tunnelpass_bans_total"), 1)
        self.assertEqual(metric(metrics, "tunnelpass_client_connected"), 1)
        self.assertEqual(try_key(tunnel.tunnel_port, b"not the key 0123456789abcdef"), TRY_LATER)
        log = tunnel.server.log()
        bans = [line for line in log.splitlines() if "banned 127.0.0.1" in line]
        self.assertEqual(len(bans), 1, log)
        self.assertIn("#warn] banned 127.0.0.1", bans[0])
        self.assertIn("for 60 s: 5 wrong keys within 60 s", bans[0])
