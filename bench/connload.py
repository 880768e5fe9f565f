"""Concurrent new connections: N clients, each connecting, echoing 64 bytes and closing in a loop.

One thread drives every client with non-blocking sockets and ``selectors``
(no thread per client: the benchmark's own Python work per connection stays
small next to the relay's, and no GIL hand-over sits inside a latency).  A
connection's latency runs from ``connect()`` to the last echoed byte; its
close follows, and the client starts its next connection at once.  The
result is the rate of completed connections over the run and the p50/p99 of
their latencies, like the sequential measurement in ``bench.py``.
"""

from __future__ import annotations

import errno
import selectors
import socket
import statistics
import time

MESSAGE = b"x" * 64
CLIENTS = 32


class _Client:
    """One connect / send / receive-64 / close cycle at a time."""

    def __init__(self, selector: selectors.BaseSelector, port: int):
        self.selector, self.port = selector, port
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.got = 0
        self.registered = False

    def begin(self) -> None:
        self.sock = socket.socket()
        self.registered = False
        self.sock.setblocking(False)
        self.started = time.perf_counter()
        self.got = 0
        code = self.sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, "connect")
        self.selector.register(self.sock, selectors.EVENT_WRITE, self)
        self.registered = True

    def ready(self) -> float | None:
        """Handle one readiness event; the connection's latency (s) when its echo is complete."""
        sock = self.sock
        if self.selector.get_key(sock).events == selectors.EVENT_WRITE:  # connected (or failed)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, "connect")
            sock.send(MESSAGE)  # 64 bytes fit in any fresh socket's buffer
            self.selector.modify(sock, selectors.EVENT_READ, self)
            return None
        data = sock.recv(64 - self.got)
        if not data:
            raise OSError("closed before the echo")
        self.got += len(data)
        if self.got < len(MESSAGE):
            return None
        self.end()
        return time.perf_counter() - self.started

    def end(self) -> None:
        if self.sock is not None:
            if self.registered:
                self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


def concurrent(port: int, seconds: float, clients: int = CLIENTS,
               timeout: float = 5.0) -> tuple[float, float, float, int]:
    """*clients* clients in a loop for *seconds*: p50 ms, p99 ms, connections/s, failures.

    A connection that fails, or has no echo within *timeout*, counts as a
    failure and its client starts over."""
    selector = selectors.DefaultSelector()
    pool = [_Client(selector, port) for _ in range(clients)]
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while (now := time.perf_counter()) < deadline:
            for client in pool:  # (re)start the idle ones; a stuck one's relay dropped it silently
                if client.sock is not None and now - client.started > timeout:
                    failures += 1
                    client.end()
                if client.sock is None:
                    try:
                        client.begin()
                    except OSError:  # e.g. no free ephemeral port: count it, retry next pass
                        failures += 1
                        client.end()
            for key, _ in selector.select(min(0.2, deadline - now)):
                client = key.data
                try:
                    latency = client.ready()
                except OSError:
                    failures += 1
                    client.end()
                    continue
                if latency is not None:
                    latencies.append(latency * 1000)
        elapsed = time.perf_counter() - started
    finally:
        for client in pool:
            client.end()
        selector.close()
    if not latencies:
        return float("nan"), float("nan"), 0.0, failures
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99, len(latencies) / elapsed, failures
