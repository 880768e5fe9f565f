"""A hostile HTTP/2 peer against a real ``twistd`` server at ``--type 3``.

The peer has the key (an insider: the worst case), authenticates with the
project's sans-IO classes and then writes raw HTTP/2 (tests.e2e.hostile_mux).
Each case checks the documented outcome -- the carrier closed, or one
stream refused and the carrier up -- and that the server process is still
up and a well-behaved carrier of the same session still carries a stream.
One server per class (trial has no setUpClass: started by the first test,
killed at exit); the unit-speed side is tests/test_mux_hostile.py."""

from __future__ import annotations

import atexit
import os
import re
import socket
import struct
import tempfile
import time

import hpack
from twisted.trial import unittest

from tests.e2e.harness import Twistd, free_port, rss_kib, wait_until
from tests.e2e.hostile_mux import (
    CONTINUATION, DATA, END_HEADERS, FLOW_CONTROL_ERROR, HEADERS, OPEN_TCP, PING, PUSH_PROMISE,
    REFUSED_STREAM, RST_STREAM, SETTINGS, WINDOW_UPDATE, Backend, Carrier, Insider, echo_through, frame, h2_peer,
    resets, serve_one, stream_echo,
)
from tests.e2e.tunnel_harness import KEY
from tunnelpass.carriers.muxconn import MAX_FRAME, RESET_BURST
from tunnelpass.wire.codec import Type


def headers(stream_id: int, fields=OPEN_TCP, flags: int = END_HEADERS) -> bytes:
    return frame(HEADERS, flags, stream_id, hpack.Encoder().encode(fields))


class _Process:
    """What Twistd and Backend want of a test case, for a server that
    outlives one test: a directory, and cleanups run at exit."""

    def mktemp(self) -> str:
        return tempfile.mkdtemp(prefix="mux-hostile-")

    def addCleanup(self, function, *args) -> None:
        atexit.register(function, *args)


class _SharedServer(unittest.TestCase):
    flow, tls, carrier_type = "send", 0, 3
    shared: dict | None = None

    def setUp(self):
        cls = type(self)
        if cls.shared is None:
            keeper = _Process()
            backend = Backend(keeper)
            port, entry = free_port(), free_port()
            target = f"127.0.0.1:{backend.port}" if self.flow == "send" else f"127.0.0.1:{entry}"
            server = Twistd(keeper, ["--mode", "server", "--tunnel", f"127.0.0.1:{port}", "--target", target,
                                     "--tls", str(self.tls), "--flow", self.flow, "--type", str(self.carrier_type),
                                     "--key", KEY, "--heartbeat", "60s", "--report-interval", "0.5s"],
                            ready="server running")
            cls.shared = {"server": server, "backend": backend, "port": port, "entry": entry}
        self.server, self.backend = self.shared["server"], self.shared["backend"]
        self.port, self.entry = self.shared["port"], self.shared["entry"]
        self.assertIsNone(self.server.process.poll(), "the server died in an earlier test")
        if "insider" not in self.shared:
            self.shared["insider"] = Insider(self.port, self.tls)
        self.insider = self.shared["insider"]
        self.carriers: list[Carrier] = []
        self.addCleanup(lambda: [c.close() for c in self.carriers])

    def fresh(self, rcvbuf=None, window=None):
        """A carrier after a valid preface and SETTINGS (and the server's acked)."""
        carrier = self.insider.carrier(rcvbuf)
        self.carriers.append(carrier)
        conn = h2_peer(client_side=self.flow == "send", window=window)
        conn.receive_data(bytes(carrier.received))
        carrier.send(conn.data_to_send())
        carrier.received.clear()
        return carrier, conn

    def assert_closed(self, carrier: Carrier) -> bytes:
        return carrier.read_until_closed(10)

    def assert_survived(self):
        self.assertIsNone(self.server.process.poll(), f"the server died:\n{self.server.log()}")
        payload = os.urandom(2000)
        if self.flow == "send":
            self.assertEqual(echo_through(self.insider, payload), payload)
        else:
            for _ in range(3):  # a user may meet a hostile carrier the server has not seen close yet
                if serve_one(self.insider, self.entry, payload) == payload:
                    return
            self.fail("no stream through a well-behaved carrier")

    def health(self, field: str) -> int:
        lines = [line for line in self.server.log().splitlines() if f" {field}=" in line]
        return int(re.search(rf" {field}=(\d+)", lines[-1]).group(1)) if lines else 0


class SendFlowFramingTests(_SharedServer):
    """The server as the HTTP/2 server (send flow, tls 0): malformed and
    out-of-bounds framing closes that carrier only."""

    def test_bad_preface(self):
        carrier = self.insider.carrier()
        self.carriers.append(carrier)
        carrier.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assert_closed(carrier)
        self.assert_survived()

    def test_garbage_after_mux_ok(self):
        carrier = self.insider.carrier()
        self.carriers.append(carrier)
        carrier.send(os.urandom(4096))
        self.assert_closed(carrier)
        self.assert_survived()

    def test_oversized_frame(self):
        carrier, _ = self.fresh()
        carrier.send(headers(1) + frame(DATA, 0, 1, b"x" * (MAX_FRAME + 1)))
        self.assert_closed(carrier)
        self.assert_survived()

    def test_unknown_frame_types_ignored_and_bounded(self):
        """Unknown frame types are ignored (RFC 9113 5.5), the carrier goes on
        carrying streams, and 32 MB of them leave no trace in memory."""
        carrier, conn = self.fresh()
        before = rss_kib(self.server.process.pid)
        # 0x20.. : no type anyone registered (0x0A ALTSVC, 0x0C ORIGIN are parsed, and checked)
        junk = b"".join(frame(kind, 0xFF, kind, b"u" * 16384) for kind in range(0x20, 0xF0)) * 8
        for _ in range(32 * 2**20 // len(junk)):
            self.assertTrue(carrier.send(junk), "the carrier was closed")
        self.assertEqual(stream_echo(carrier, conn, b"after the junk"), b"after the junk")
        self.assertLess(rss_kib(self.server.process.pid) - before, 16 * 1024)
        self.assert_survived()

    def test_stream_ids_backwards_and_even(self):
        backwards, _ = self.fresh()
        backwards.send(headers(5) + headers(3))
        even, _ = self.fresh()
        even.send(headers(2))
        self.assert_closed(backwards)
        self.assert_closed(even)
        self.assert_survived()

    def test_headers_over_max_header_list_size(self):
        carrier, _ = self.fresh()
        carrier.send(headers(1, OPEN_TCP + [(b"tp-addr", b"1" * 2000)]))
        self.assert_closed(carrier)
        self.assert_survived()

    def test_continuation_flood(self):
        """HEADERS without END_HEADERS, then CONTINUATION frames without end:
        h2 holds at most 64 of them; the carrier is closed."""
        carrier, _ = self.fresh()
        carrier.send(headers(1, flags=0) + frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 200)
        self.assert_closed(carrier)
        self.assert_survived()

    def test_unknown_kind_and_malformed_tp_addr_are_refused_streams(self):
        """REFUSED_STREAM for that stream only: the same carrier then
        carries a well-formed stream."""
        carrier, conn = self.fresh()
        conn.send_headers(1, [(b":method", b"CONNECT"), (b":protocol", b"sctp")])
        conn.send_headers(3, OPEN_TCP + [(b"tp-addr", b"192.0.2.1 99999 192.0.2.2 80")])
        carrier.send(conn.data_to_send())
        wait_until(lambda: carrier.read_for(0.05) and resets(bytes(carrier.received)) == {1: REFUSED_STREAM,
                                                                                          3: REFUSED_STREAM},
                   10, what="two REFUSED_STREAMs")
        self.assertEqual(stream_echo(carrier, conn, b"still up"), b"still up")
        self.assert_survived()

    def test_window_update_overflow(self):
        """Past 2^31-1 on the connection: the carrier is closed; on one
        stream: that stream is reset with FLOW_CONTROL_ERROR."""
        connection, _ = self.fresh()
        connection.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 2**31 - 1)))
        self.assert_closed(connection)
        stream, _ = self.fresh()
        stream.send(headers(1) + frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 2**31 - 1)))
        wait_until(lambda: stream.read_for(0.05) and resets(bytes(stream.received)).get(1) == FLOW_CONTROL_ERROR,
                   10, what="RST_STREAM(FLOW_CONTROL_ERROR)")
        self.assert_survived()

    def test_data_beyond_the_window(self):
        """A stream whose target stalls stops being acknowledged; DATA past
        its window closes the carrier."""
        carrier, _ = self.fresh()
        carrier.send(headers(1) + frame(DATA, 0, 1, b"STALL"))
        chunk = frame(DATA, 0, 1, b"d" * 16384)
        for _ in range(8 * 2**20 // 16384):
            if not carrier.send(chunk):
                break
        self.assert_closed(carrier)
        self.assert_survived()


class SendFlowAbuseTests(_SharedServer):
    """Within the framing rules, abuse of what HTTP/2 allows: bounded."""

    def test_rapid_reset(self):
        """HEADERS then RST_STREAM, thousands at once (CVE-2023-44487): once
        over its budget the carrier refuses new streams (no dial) instead of
        serving them, the target is dialled at most once per allowed stream,
        and a good carrier is served at once."""
        carrier, _ = self.fresh()
        encoded = hpack.Encoder().encode(OPEN_TCP)
        dials = self.backend.accepted
        burst = b"".join(frame(HEADERS, END_HEADERS, sid, encoded) + frame(RST_STREAM, 0, sid, b"\0\0\0\x08")
                         for sid in range(1, 2 * 20_000, 2))
        carrier.send(burst)
        wait_until(lambda: "rapid reset" in self.server.log(), 10, what="the carrier_abuse log line")
        started = time.monotonic()
        self.assert_survived()
        self.assertLess(time.monotonic() - started, 5)
        self.assertLessEqual(self.backend.accepted - dials, RESET_BURST + 1)

    def test_ping_and_settings_flood_never_reading(self):
        """PING and SETTINGS each ask for an ack; a peer that never reads
        them is dropped once a bounded amount is waiting for it."""
        carrier, _ = self.fresh(rcvbuf=4096)
        before = rss_kib(self.server.process.pid)
        flood = (frame(PING, 0, 0, b"12345678") + frame(SETTINGS, 0, 0)) * 4000
        carrier.sock.settimeout(5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                carrier.sock.sendall(flood)
            except socket.timeout:
                continue  # the server is busy with the backlog: that is not a drop
            except OSError:
                break
        else:
            self.fail("the server still reads a peer that reads nothing after 20 s")
        self.assertLess(rss_kib(self.server.process.pid) - before, 32 * 1024)
        wait_until(lambda: "does not read" in self.server.log(), 5, what="the carrier_abuse log line")
        self.assert_survived()

    def test_peer_never_reads_a_stream(self):
        """A stream from a target that sends without end, to a peer that
        opened every window and reads nothing: the server holds a bounded
        amount (TCP backpressure pauses the target, not memory)."""
        carrier, conn = self.fresh(rcvbuf=4096, window=2**31 - 1)
        conn.increment_flow_control_window(2**31 - 1 - conn.inbound_flow_control_window)
        carrier.send(conn.data_to_send())
        before = rss_kib(self.server.process.pid)
        carrier.send(headers(1) + frame(DATA, 0, 1, b"SOURCE"))
        time.sleep(1.5)  # the target sends as fast as it can meanwhile
        self.assertLess(rss_kib(self.server.process.pid) - before, 32 * 1024)
        self.assert_survived()


class BeforeAuthenticationTests(_SharedServer):
    """Carrier authentication at a --type 3 server: each refusal closes the
    connection and counts in handshake_failures."""

    def refused(self, auth: bytes, sock) -> None:
        sock.sendall(auth)
        sock.settimeout(10)
        try:
            self.assertEqual(sock.recv(100), b"", "the server answered")
        except ConnectionResetError:
            pass
        sock.close()

    def test_wrong_mac_replay_and_pool_auth(self):
        failures = self.health("handshake_failures")
        sock, fp = self.insider.connect()
        auth = bytearray(self.insider.auth_frame(fp))
        auth[-1] ^= 1
        self.refused(bytes(auth), sock)
        self.carriers.append(self.insider.carrier())  # accepted: its counter is spent
        spent = self.insider.counter
        sock, fp = self.insider.connect()
        self.refused(self.insider.auth_frame(fp, counter=spent), sock)  # a replay (fresh id, valid MAC)
        sock, fp = self.insider.connect()
        self.refused(self.insider.auth_frame(fp, Type.POOL_AUTH), sock)
        wait_until(lambda: self.health("handshake_failures") >= failures + 3, 10, what="three handshake failures")
        self.assert_survived()


class PoolServerRefusesMuxAuthTests(_SharedServer):
    carrier_type = 0

    def test_mux_auth_at_a_type_0_server(self):
        failures = self.health("handshake_failures")
        sock, fp = self.insider.connect()
        BeforeAuthenticationTests.refused(self, self.insider.auth_frame(fp), sock)
        wait_until(lambda: self.health("handshake_failures") >= failures + 1, 10, what="a handshake failure")
        self.assertIsNone(self.server.process.poll())


class ReceiveFlowTests(_SharedServer):
    """The server as the HTTP/2 client (receive flow): the hostile side is
    the HTTP/2 server its users' streams go to."""

    flow = "receive"

    def test_streams_opened_by_the_wrong_side(self):
        """HEADERS on a new stream, or PUSH_PROMISE, from the side that must
        not open streams: the carrier is closed."""
        headers_carrier, _ = self.fresh()
        headers_carrier.send(headers(2))
        push, _ = self.fresh()
        push.send(frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\x02"))
        self.assert_closed(headers_carrier)
        self.assert_closed(push)
        self.assert_survived()

    def test_peer_never_reads(self):
        """A user sends without end; the carrier's peer never reads: the
        server holds a bounded amount and the user is paused."""
        carrier, conn = self.fresh(rcvbuf=4096)
        user = socket.create_connection(("127.0.0.1", self.entry), timeout=1)
        self.addCleanup(user.close)
        before = rss_kib(self.server.process.pid)
        sent, chunk, deadline = 0, b"u" * 65536, time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sent += user.send(chunk)
            except socket.timeout:
                break
        self.assertLess(rss_kib(self.server.process.pid) - before, 32 * 1024)
        self.assertLess(sent, 64 * 2**20, "nothing paused the user")
        user.close()
        carrier.close()
        self.assert_survived()


class TLSTests(_SharedServer):
    tls = 1

    def test_garbage_after_mux_ok_in_tls(self):
        carrier = self.insider.carrier()
        self.carriers.append(carrier)
        carrier.send(os.urandom(4096))
        self.assert_closed(carrier)
        self.assert_survived()
