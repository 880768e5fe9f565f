# -*- test-case-name: tests.test_ratelimit -*-
"""``--rate``: one bandwidth budget for the whole instance.

A token bucket in bytes, shared by every relayed connection and UDP
session, both directions.  Relays ask :meth:`RateLimiter.take` after moving bytes; a
positive answer is how long to stop reading the side that sent them --
nothing is buffered to enforce the rate, the senders are simply paused
(TCP flow control does the rest).  UDP has no sender to pause: a datagram
the budget cannot pay for now is dropped (:meth:`RateLimiter.admit`).
"""

from __future__ import annotations

from twisted.logger import Logger

from tunnelpass.ops.logs import Throttle

log = Logger(namespace="tunnelpass.rate")


class RateLimiter:
    def __init__(self, clock, bytes_per_second: float, burst_seconds: float = 0.05):
        if bytes_per_second <= 0:
            raise ValueError("the rate must be positive")
        self.clock = clock
        self.rate = float(bytes_per_second)
        # A small burst keeps the rate smooth at a 50 ms scale but still lets
        # one 64 KiB read through at low rates.
        self.burst = max(self.rate * burst_seconds, 65536.0)
        self.tokens = self.burst
        self.stamp = clock.seconds()
        self.paused_total = 0  # times a sender had to wait (for reports)
        self.dropped_total = 0  # UDP datagrams over the budget
        self._reported = Throttle(clock, 10.0)

    def take(self, count: int) -> float:
        """Account *count* bytes; seconds the sender should now wait."""
        now = self.clock.seconds()
        elapsed = max(0.0, now - self.stamp)  # a wall clock may step back
        self.stamp = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate) - count
        if self.tokens >= 0:
            return 0.0
        self.paused_total += 1
        self._report()
        return -self.tokens / self.rate

    def admit(self, count: int) -> bool:
        """UDP: a datagram cannot be paused, only dropped.  Spend *count*
        bytes if the budget has them now (``True``), else spend nothing and
        say drop it (``False``)."""
        now = self.clock.seconds()
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= count:
            self.tokens -= count
            return True
        self.dropped_total += 1
        self._report()
        return False

    def _report(self) -> None:
        """The limit is being hit: say so, at most every 10 s."""
        if self._reported.ready():
            log.info("--rate {mbps:g} Mbit/s reached: {count} wait(s) or drop(s) since the last report "
                     "(senders paused {paused} time(s), {dropped} UDP datagram(s) dropped in all)",
                     mbps=self.rate * 8 / 1e6, count=self._reported.take_count(), paused=self.paused_total,
                     dropped=self.dropped_total, event="rate_limited")


def parse_rate(text: str) -> float:
    """``--rate`` in Mbit/s (decimal, as iperf reports) -> bytes/s; 0 = off."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of Mbit/s") from None
    if not 0 <= value <= 1_000_000 or value != value:
        raise ValueError("the rate must be 0 (off) to 1,000,000 Mbit/s")
    return value * 1_000_000 / 8
