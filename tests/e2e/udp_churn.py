"""DNS-style UDP churn for end-to-end tests: many one-shot queries, each
from a fresh socket (a fresh source port, as resolvers and stub libraries
use), paced at a fixed rate, each waiting a bounded time for its answer.

One thread and a selector: a socket is closed as soon as its answer comes
or its deadline passes, so only the queries in flight hold a descriptor
(a few hundred at 1,000/s), never all of them.

    python -m tests.e2e.udp_churn PORT [COUNT] [RATE]   # prints the result
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field


@dataclass
class ChurnResult:
    sent: int = 0
    answered: int = 0
    wrong: int = 0  # an answer that was not the query's own
    send_errors: int = 0
    latencies: list = field(default_factory=list)  # seconds, answered queries
    lost_numbers: list = field(default_factory=list)  # which queries got no answer
    elapsed: float = 0.0
    rate: float = 1000.0

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    def latency(self, quantile: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")

    def lost_per_second(self) -> list[int]:
        """Unanswered queries by the second they were sent in."""
        seconds = [0] * (int(self.sent / self.rate) + 1)
        for number in self.lost_numbers:
            seconds[int(number / self.rate)] += 1
        return seconds

    def __str__(self) -> str:
        return (f"{self.answered}/{self.sent} answered ({self.lost} lost, {self.wrong} wrong, "
                f"{self.send_errors} send errors) in {self.elapsed:.2f}s; latency p50 "
                f"{self.latency(0.5) * 1000:.1f} ms, p99 {self.latency(0.99) * 1000:.1f} ms, "
                f"max {self.latency(1.0) * 1000:.1f} ms; lost per second sent {self.lost_per_second()}")


def query(number: int) -> bytes:
    """A DNS-shaped query (12-byte header, one question); an echo backend
    sends it back, so the answer identifies its query."""
    header = struct.pack("!HHHHHH", number & 0xFFFF, 0x0100, 1, 0, 0, 0)
    return header + b"\x01q" + b"%06d" % number + b"\x0ctunnelpass\x04test\x00" + struct.pack("!HH", 1, 1)


def churn(port: int, count: int = 5000, rate: float = 1000.0, timeout: float = 2.0,
          host: str = "127.0.0.1", on_tick=None) -> ChurnResult:
    """Send *count* queries to *host*:*port* at *rate* per second, each from
    a new socket, and wait up to *timeout* for each answer.  *on_tick*, if
    given, is called about every 10 ms (to sample something meanwhile)."""
    result = ChurnResult(rate=rate)
    selector = selectors.DefaultSelector()
    waiting: dict[socket.socket, tuple[int, float]] = {}  # socket -> (query number, sent at)
    start = time.monotonic()
    next_tick = start

    def finish(sock: socket.socket, answered: bool = False) -> None:
        selector.unregister(sock)
        sock.close()
        number, _ = waiting.pop(sock)
        if not answered:
            result.lost_numbers.append(number)

    number = 0
    while number < count or waiting:
        now = time.monotonic()
        # Send every query that is due (catching up after a stall).
        while number < count and start + number / rate <= now:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            result.sent += 1
            try:
                sock.sendto(query(number), (host, port))
            except OSError:
                result.send_errors += 1
                result.lost_numbers.append(number)
                sock.close()
            else:
                waiting[sock] = (number, now)
                selector.register(sock, selectors.EVENT_READ)
            number += 1
        # Expire the oldest queries (dicts keep insertion order).
        for sock, (_, sent_at) in list(waiting.items()):
            if now - sent_at < timeout:
                break
            finish(sock)
        if on_tick is not None and now >= next_tick:
            on_tick()
            next_tick = now + 0.01
        due = start + number / rate if number < count else now + 0.05
        for key, _ in selector.select(max(0.0, min(due - time.monotonic(), 0.01))):
            sock = key.fileobj
            expected, sent_at = waiting[sock]
            try:
                data = sock.recv(65535)
            except OSError:  # ICMP port unreachable: no answer
                finish(sock)
                continue
            if data == query(expected):
                result.answered += 1
                result.latencies.append(time.monotonic() - sent_at)
                finish(sock, answered=True)
            else:
                result.wrong += 1
                finish(sock)
    selector.close()
    result.elapsed = time.monotonic() - start
    return result


if __name__ == "__main__":
    arguments = sys.argv[1:]
    print(churn(int(arguments[0]), *(int(a) for a in arguments[1:3])))
