"""End-to-end: a real ``twistd tunnelpass --mode forward`` process, real sockets."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import (
    ROOT,
    echo_backends,
    TWISTD,
    Forwarder,
    Streamer,
    TCPServer,
    UDPEchoServer,
    can_connect,
    free_port,
    rss_kib,
    tcp_round_trip,
    udp_round_trip,
    wait_until,
)


class ForwardingTests(unittest.TestCase):
    """Data-path tests; run once per relay engine (see the subclass below)."""

    relay_args: tuple = ()

    def forwarder(self, rules, *args, **kw):
        return Forwarder(self, rules, *self.relay_args, *args, **kw)

    def test_tcp_and_udp_echo(self):
        tcp = echo_backends(self)  # one backend port for both protocols
        port, named = free_port(), free_port()
        self.forwarder(f"127.0.0.1:{port}/tcp+udp | 127.0.0.1 | {tcp.port}\n"
                        f"127.0.0.1:{named} | localhost | {tcp.port}\n")
        self.assertEqual(tcp_round_trip(port, b"hello tcp"), b"hello tcp")
        self.assertEqual(tcp_round_trip(named, b"via a name"), b"via a name")
        self.assertEqual(udp_round_trip(port, b"1"), b"1")
        big = os.urandom(60 * 1024)
        self.assertEqual(udp_round_trip(port, big), big, "a 60 KB datagram arrives whole")
        self.assertEqual(udp_round_trip(port, b"\x00" * 65507), b"\x00" * 65507)

    def test_ipv6_listener_to_named_udp_remote(self):
        udp = UDPEchoServer(self)
        port = free_port()
        self.forwarder(f"[::1]:{port}/udp | localhost | {udp.port}\n")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(b"v6", ("::1", port))
            self.assertEqual(s.recvfrom(100)[0], b"v6")

    def test_stream_50mb_with_checksum(self):
        tcp = TCPServer(self)
        port = free_port()
        self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        size = 50 * 1024 * 1024
        block = os.urandom(1 << 20)
        sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)

        def send():
            for _ in range(size // len(block)):
                sock.sendall(block)
                sent_hash.update(block)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        while True:
            data = sock.recv(1 << 18)
            if not data:
                break
            got_hash.update(data)
            received += len(data)
        sender.join()
        sock.close()
        self.assertEqual(received, size)
        self.assertEqual(got_hash.hexdigest(), sent_hash.hexdigest())

    def test_max_conns_refuses_excess(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port} | max-conns=1\n")
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(b"a")
        self.assertEqual(held.recv(1), b"a")
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.assertEqual(extra.recv(10), b"", "the excess connection is closed at once")
        extra.close()
        fwd.wait_for_log("max-conns 1 reached")
        held.close()
        wait_until(lambda: tcp_round_trip(port, b"b") == b"b", what="a slot after the first closed")

    def test_slow_consumer_keeps_memory_bounded(self):
        source = TCPServer(self, "source")
        port = free_port()
        fwd = self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {source.port}\n")
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.recv(1)
        before = rss_kib(fwd.process.pid)
        time.sleep(2)  # the source pushes as fast as it can; we do not read
        grown = rss_kib(fwd.process.pid) - before
        self.assertLess(grown, 8 * 1024, f"forwarder RSS grew {grown} KiB with a stalled reader")
        received = 0
        while received < 4 << 20:  # and the stream still flows once we read
            received += len(sock.recv(1 << 16))
        sock.close()


    # (drain and idle tests below exercise each engine's abort path)

    def test_idle_connection_is_closed(self):
        tcp = TCPServer(self)
        port = free_port()
        self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port} | idle=300ms\n")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
            self.assertEqual(s.recv(1), b"x")
            started = time.monotonic()
            try:
                self.assertEqual(s.recv(1), b"")
            except ConnectionResetError:
                pass
            self.assertLess(time.monotonic() - started, 4)

    def test_sigterm_drains_live_connections(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n", "--shutdown-timeout", "30s")
        live = socket.create_connection(("127.0.0.1", port), timeout=5)
        live.sendall(b"before")
        self.assertEqual(live.recv(100), b"before")
        fwd.signal(signal.SIGTERM)
        fwd.wait_for_log("draining 1 live connection")
        self.assertFalse(can_connect(port), "no new connections while draining")
        live.sendall(b"during drain")
        self.assertEqual(live.recv(100), b"during drain")
        live.shutdown(socket.SHUT_WR)
        self.assertEqual(live.recv(100), b"")
        live.close()
        self.assertEqual(fwd.wait_exit(10), 0)
        self.assertIn("(final)", fwd.log())

    def test_sigterm_aborts_after_shutdown_timeout(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = self.forwarder(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n", "--shutdown-timeout", "500ms")
        live = socket.create_connection(("127.0.0.1", port), timeout=5)
        live.sendall(b"x")
        live.recv(1)
        started = time.monotonic()
        fwd.signal(signal.SIGTERM)
        self.assertEqual(fwd.wait_exit(10), 0)
        self.assertLess(time.monotonic() - started, 5)
        try:
            self.assertEqual(live.recv(10), b"")
        except ConnectionResetError:
            pass
        live.close()


class CopyRelayForwardingTests(ForwardingTests):
    """The same data-path tests with --zero-copy off: Twisted transports with
    producers wired both ways (the engine TLS connections will use)."""

    relay_args = ("--zero-copy", "off")


class ReloadTests(unittest.TestCase):
    def test_sighup_adds_and_removes_without_touching_live_connections(self):
        tcp = echo_backends(self)
        kept, removed, added = free_port(), free_port(), free_port()
        fwd = Forwarder(self, f"127.0.0.1:{kept}/tcp+udp | 127.0.0.1 | {tcp.port}\n"
                              f"127.0.0.1:{removed} | 127.0.0.1 | {tcp.port}\n")
        stream = Streamer(kept)
        on_removed = socket.create_connection(("127.0.0.1", removed), timeout=5)
        wait_until(lambda: stream.progress() > 50_000, what="stream flowing")
        fwd.reload(f"# the first rule moved down a line, unchanged\n"
                   f"127.0.0.1:{kept}/tcp+udp | 127.0.0.1 | {tcp.port}\n"
                   f"127.0.0.1:{added} | 127.0.0.1 | {tcp.port}\n")
        fwd.wait_for_log("1 added, 1 removed, 0 updated, 2 unchanged")
        self.assertEqual(tcp_round_trip(added, b"new rule"), b"new rule")
        self.assertFalse(can_connect(removed), "a removed rule stops listening")
        on_removed.sendall(b"still here")
        self.assertEqual(on_removed.recv(100), b"still here", "its live connection finishes normally")
        on_removed.close()
        self.assertEqual(udp_round_trip(kept, b"udp kept"), b"udp kept")
        mark = stream.progress()
        wait_until(lambda: stream.progress() > mark + 100_000, what="stream continuing after reload")
        stream.finish()
        self.assertIsNone(stream.error, f"long-lived connection was disturbed: {stream.error}")

    def test_update_in_place_keeps_listening_socket(self):
        tcp, other = TCPServer(self), TCPServer(self, "source")
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        stream = Streamer(port)
        wait_until(lambda: stream.progress() > 10_000, what="stream flowing")
        fwd.reload(f"127.0.0.1:{port} | 127.0.0.1 | {other.port} | idle=1h\n")
        fwd.wait_for_log("0 added, 0 removed, 1 updated")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            self.assertEqual(s.recv(1), b"s", "new connections go to the new remote")
        mark = stream.progress()
        wait_until(lambda: stream.progress() > mark + 50_000, what="old connection unaffected")
        stream.finish()
        self.assertIsNone(stream.error)

    def test_invalid_file_on_reload_keeps_old_rules(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        fwd.reload(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n1 | nowhere | 99999\n")
        fwd.wait_for_log("reload rejected, keeping the current rules")
        self.assertIn(f"{fwd.config}:2: remote port", fwd.log())
        self.assertEqual(tcp_round_trip(port, b"old rules"), b"old rules")
        self.assertIsNone(fwd.process.poll())

    def test_empty_file_is_refused_unless_marked_empty(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        fwd.reload("")  # an editor's half-written save
        fwd.wait_for_log("reload refused, keeping the current 1 listener(s)")
        self.assertEqual(tcp_round_trip(port, b"rules kept"), b"rules kept")
        fwd.reload("# tunnelpass: empty\n")
        fwd.wait_for_log("0 added, 1 removed")
        self.assertIn(f"rule removed: 127.0.0.1:{port}/tcp -> 127.0.0.1:{tcp.port}", fwd.log())
        self.assertFalse(can_connect(port), "the marked-empty file removed the listener")

    def test_reload_interval_picks_up_file_changes(self):
        tcp = TCPServer(self)
        first, second = free_port(), free_port()
        fwd = Forwarder(self, f"127.0.0.1:{first} | 127.0.0.1 | {tcp.port}\n", "--reload-interval", "200ms")
        fwd.write_rules(f"127.0.0.1:{second} | 127.0.0.1 | {tcp.port}\n")
        fwd.wait_for_log("1 added, 1 removed")
        self.assertEqual(tcp_round_trip(second, b"watched"), b"watched")

    def test_burst_of_sighups_coalesces(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        for _ in range(20):
            fwd.signal(signal.SIGHUP)
        fwd.wait_for_log("reloaded")
        self.assertIsNone(fwd.process.poll(), "SIGHUP must never kill the forwarder")
        self.assertEqual(tcp_round_trip(port, b"alive"), b"alive")


class LifecycleTests(unittest.TestCase):
    def test_empty_rules_file_starts_and_warns(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = Forwarder(self, "# nothing yet\n")
        self.assertIn("forwarder running with no rules", fwd.log())
        fwd.reload(f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n")
        fwd.wait_for_log("1 added, 0 removed")
        self.assertEqual(tcp_round_trip(port, b"first rule"), b"first rule")

    def test_sigint_exits_zero(self):
        fwd = Forwarder(self, f"127.0.0.1:{free_port()} | 127.0.0.1 | 9\n")
        fwd.signal(signal.SIGINT)
        self.assertEqual(fwd.wait_exit(), 0)

    def test_busy_port_is_fatal(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        fwd = Forwarder(self, f"127.0.0.1:{free_port()} | 127.0.0.1 | 9\n127.0.0.1:{port} | 127.0.0.1 | 9\n",
                        wait=False)
        self.assertNotEqual(fwd.wait_exit(), 0)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}/tcp: Address already in use", fwd.log())

    def test_bad_rules_file_is_fatal(self):
        fwd = Forwarder(self, "1 | a | 2\n# fine\n70000 | a | 2\n", wait=False)
        self.assertNotEqual(fwd.wait_exit(), 0)
        self.assertIn(f"{fwd.config}:3: listen port: invalid port '70000'", fwd.log())

    def test_missing_rules_file_is_fatal(self):
        fwd = Forwarder(self, "", "--config", "/nonexistent/rules.conf", wait=False)
        self.assertNotEqual(fwd.wait_exit(), 0)
        self.assertIn("tunnelpass: --config /nonexistent/rules.conf: No such file or directory", fwd.log())

    def test_unknown_option_is_fatal(self):
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "forward", "--bogus"],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("option --bogus not recognized", result.stdout + result.stderr)

    def test_a_master_on_a_busy_api_port_is_fatal(self):
        """A busy --api port ends a master at once: exit 1, one line."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        state = os.path.abspath(self.mktemp())
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "master", "--api",
                                 f"127.0.0.1:{busy.getsockname()[1]}", "--state-dir", state],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"--api 127.0.0.1:{busy.getsockname()[1]}: cannot listen", result.stdout + result.stderr)

    def test_json_logs_carry_stats(self):
        tcp = TCPServer(self)
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {tcp.port}\n",
                        "--log-format", "json", "--report-interval", "200ms")
        tcp_round_trip(port, b"12345")
        fwd.wait_for_log('"event": "stats"', count=2)
        fwd.signal(signal.SIGTERM)
        self.assertEqual(fwd.wait_exit(), 0)
        events = [json.loads(line) for line in fwd.log().splitlines() if line.startswith("{")]
        final = [e for e in events if e.get("event") == "stats" and e.get("final")]
        self.assertEqual(len(final), 1)
        self.assertEqual((final[0]["accepted"], final[0]["bytes_in"], final[0]["bytes_out"]), (1, 5, 5))
        self.assertEqual(final[0]["listener"], f"127.0.0.1:{port}/tcp")

    def test_log_level_filters(self):
        fwd = Forwarder(self, f"127.0.0.1:{free_port()} | 127.0.0.1 | 9\n", "--log", "warn", wait=False)
        wait_until(lambda: can_connect(int(open(fwd.config).read().split(":")[1].split()[0])),
                   what="listener up")
        fwd.signal(signal.SIGTERM)
        self.assertEqual(fwd.wait_exit(), 0)
        self.assertNotIn("listening on", fwd.log())
