"""Real processes and sockets for end-to-end tests.

``Forwarder`` runs ``twistd -n --pidfile= tunnelpass --mode forward`` as a
subprocess with its log captured to a file; backends are small blocking
servers in threads of the test process.  Readiness is polled (port or log
line) with a bounded deadline, never slept for.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()


def free_port(kind=socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP right now, chosen outside
    the kernel's ephemeral range: a port from ``bind(0)`` can be handed to
    an outgoing connection (a pool dial, a client) before the process
    under test binds it."""
    low, high = _EPHEMERAL
    candidates = [port for port in (*range(10000, low), *range(high + 1, 65536))
                  if _WORKER_SLOT is None or port % _WORKER_SLOTS == _WORKER_SLOT]
    for _ in range(200):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue  # free now, but promised to an earlier caller that has not bound it yet
        try:
            for family_kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, family_kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port")


def _worker_slot() -> int | None:
    """Under ``trial -j N`` each worker runs in ``_trial_temp/<index>``:
    workers then take ports from disjoint residue classes, so two test
    processes never hand out the same port (each only knows its own)."""
    cwd = os.getcwd()
    name, parent = os.path.basename(cwd), os.path.basename(os.path.dirname(cwd))
    if name.isdigit() and parent.startswith("_trial_temp"):
        return int(name) % _WORKER_SLOTS
    return None


_WORKER_SLOTS = 8
_WORKER_SLOT = _worker_slot()

#: Ports free_port returned in this process: two calls before either port
#: is bound (a tunnel's --tunnel and --target) must not get the same one.
_HANDED_OUT: set[int] = set()


#: ``make test`` runs the suite in two phases: ``trial -j2`` over everything
#: with this variable set to ``parallel``, then the load tests alone.  (Not
#: ``TUNNELPASS_*``: twistd subprocesses inherit it, and tunnelpass refuses
#: an unknown ``TUNNELPASS_`` variable.)
PHASE_VARIABLE = "TP_TEST_PHASE"


def load_test(cls):
    """Marks a test class that loads the whole machine (thousands of
    connections or datagrams a second, measured against a bound): it runs
    alone in ``make test``'s second phase, since a parallel worker's load
    would make its bound a measure of the neighbour, not of tunnelpass."""
    if os.environ.get(PHASE_VARIABLE) == "parallel":
        cls.skip = "load test: runs alone in make test's serial phase"
    return cls


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def can_connect(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def udp_bound(port: int) -> bool:
    """Whether some socket on this host is bound to UDP *port* (from /proc:
    a UDP listener cannot be probed without starting a session)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        if any(int(row.split()[1].rsplit(":", 1)[1], 16) == port for row in rows):
            return True
    return False


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Twistd:
    """A ``twistd -n --pidfile= tunnelpass ARGS`` subprocess, log captured."""

    def __init__(self, testcase, args, ready: str | None = None, directory: str | None = None,
                 env: dict | None = None, prefix: tuple = ()):
        """*prefix*: a command the process runs under (``("prlimit", "--nofile=1024:1024")``)."""
        self.dir = directory or os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir, exist_ok=True)
        self.log_path = os.path.join(self.dir, f"twistd-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith("TUNNELPASS_") and not k.startswith("NP_")}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [*prefix, TWISTD, "-n", "--pidfile=", "tunnelpass", *args],
            cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT, env=environment,
        )
        testcase.addCleanup(self.kill)
        self.testcase = testcase
        if ready:
            self.wait_for_log(ready)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        def seen():
            if self.process.poll() is not None and self.log().count(text) < count:
                raise AssertionError(
                    f"twistd exited ({self.process.returncode}) before logging {text!r}:\n{self.log()}"
                )
            return self.log().count(text) >= count

        try:
            wait_until(seen, timeout, what=repr(text))
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- twistd log ---\n{self.log()}") from None

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd did not exit:\n{self.log()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


class Forwarder(Twistd):
    """A ``twistd tunnelpass --mode forward`` subprocess."""

    def __init__(self, testcase, rules: str, *args: str, wait: bool = True, prefix: tuple = ()):
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
        self.config = os.path.join(directory, "rules.conf")
        self.write_rules(rules)
        super().__init__(testcase, ["--mode", "forward", "--config", self.config, *args],
                         ready="forwarder running" if wait else None, directory=directory, prefix=prefix)

    def write_rules(self, rules: str) -> None:
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(rules)
        os.replace(tmp, self.config)

    def reload(self, rules: str | None = None) -> None:
        """Write *rules* (if given), SIGHUP, and wait for the reload to be handled."""
        done = self.log().count("reload")
        if rules is not None:
            self.write_rules(rules)
        self.signal(signal.SIGHUP)
        wait_until(lambda: self.log().count("reload") > done or self.process.poll() is not None,
                   10, what="reload log line")


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        try:
            while True:
                data = sock.recv(262144)
                if not data:
                    break
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _SourceHandler(socketserver.BaseRequestHandler):
    """Sends an endless stream (for slow-consumer tests)."""

    def handle(self):
        chunk = b"s" * 65536
        try:
            while True:
                self.request.sendall(chunk)
        except OSError:
            pass


class _GreeterHandler(socketserver.BaseRequestHandler):
    """Speaks first (as SMTP and SSH servers do), then echoes."""

    def handle(self):
        try:
            self.request.sendall(b"220 greetings\n")
            _EchoHandler.handle(self)
        except OSError:
            pass


class _StallHandler(socketserver.BaseRequestHandler):
    """Accepts and never reads (a consumer that stopped)."""

    def handle(self):
        time.sleep(30)


class TCPServer:
    """A threaded TCP backend on 127.0.0.1: ``echo``, ``source``, ``greeter``
    or ``stall``."""

    def __init__(self, testcase, kind: str = "echo", port: int = 0):
        handler = {"echo": _EchoHandler, "source": _SourceHandler, "greeter": _GreeterHandler,
                   "stall": _StallHandler}[kind]
        self.server = _ThreadingTCP(("127.0.0.1", port), handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        testcase.addCleanup(self.close)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class UDPEchoServer:
    def __init__(self, testcase, port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        testcase.addCleanup(self.sock.close)

    def _run(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
            except OSError:
                return


def echo_backends(testcase) -> TCPServer:
    """A TCP and a UDP echo server on one port number (a --target carries
    both), outside the ephemeral range: the UDP half of a TCP server's
    bind(0) port may already belong to some client socket."""
    port = free_port()
    udp = UDPEchoServer(testcase, port)
    try:
        return TCPServer(testcase, port=port)
    except OSError:
        udp.sock.close()
        raise


def udp_round_trip(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        data, _ = s.recvfrom(65535)
        return data


def scrape(port: int) -> dict:
    """A ``--metrics`` endpoint's samples: ``{(name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def tcp_round_trip(port: int, payload: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Send *payload*, half-close, read until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class Streamer:
    """A long-lived connection that keeps streaming through an echo backend
    and checks every byte comes back, in a background thread."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = 0
        self.received = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    @staticmethod
    def _byte(i: int) -> int:
        return (i * 7) % 251

    def _write(self):
        try:
            while not self._stop.is_set():
                block = bytes(self._byte(i) for i in range(self.sent, self.sent + 4096))
                self.sock.sendall(block)
                self.sent += len(block)
                time.sleep(0.005)
        except OSError as e:
            self.error = self.error or e

    def _read(self):
        try:
            while not self._stop.is_set() or self.received < self.sent:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed by the relay")
                expected = bytes(self._byte(i) for i in range(self.received, self.received + len(data)))
                if data != expected:
                    raise ValueError(f"corrupt data at offset {self.received}")
                self.received += len(data)
        except (OSError, ValueError) as e:
            if not self._stop.is_set() or self.received < self.sent:
                self.error = self.error or e

    def progress(self) -> int:
        return self.received

    def finish(self) -> None:
        self._stop.set()
        self._writer.join(10)
        self._reader.join(10)
        self.sock.close()


def accept_in_threads(listener: socket.socket, serve, on_accept=None) -> None:
    """Accept connections on *listener* until it is closed, each served by
    ``serve(sock)`` in a thread of its own; ``on_accept(sock)``, if given,
    runs first in the accepting thread (counting, keeping the socket)."""

    def loop() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            if on_accept is not None:
                on_accept(sock)
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


class ThreadedListener:
    """A TCP listener on 127.0.0.1 (*port* 0: any free one) whose every
    connection is served by ``serve(sock)`` in a thread of its own
    (:func:`accept_in_threads`); ``on_accept(sock)`` runs first, in the
    accepting thread.  ``sockets`` holds what must be closed with it: every
    accepted connection when *keep* is true, and whatever its owner adds
    (a proxy's upstream legs).  Closed at the test's cleanup."""

    def __init__(self, testcase, serve, on_accept=None, port: int = 0, backlog: int = 128,
                 rcvbuf: int | None = None, keep: bool = False):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted connections
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []

        def accepted(sock: socket.socket) -> None:
            if keep:
                self.sockets.append(sock)
            if on_accept is not None:
                on_accept(sock)

        accept_in_threads(self.listener, serve, accepted)
        testcase.addCleanup(self.close)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass

