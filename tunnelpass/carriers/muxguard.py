# -*- test-case-name: tests.test_mux_hostile -*-
"""What a carrier connection's peer may make it do, bounded (sans-IO).

HTTP/2 lets a peer cause work and memory that no flow-control window
covers; a carrier connection keeps two such things in bounds:

* **Streams reset before they carried anything** ("rapid reset",
  CVE-2023-44487): each cost the accepting side a stream and the dial of
  its target.  A budget of :data:`RESET_BURST`, refilled at
  :data:`RESET_RATE` a second; while it is spent, new streams are refused
  (RST_STREAM(REFUSED_STREAM), no dial), and the connection and its other
  streams go on.  Public users who connect and reset through an honest
  peer can spend it too, so it refuses rather than closes.
* **Answers the peer does not read**: PING and SETTINGS acknowledgements,
  window updates and resets are written even while the carrier's buffer
  is full.  At most :data:`MAX_UNREAD` bytes of them between two drains;
  beyond, the peer is dropped (GOAWAY(ENHANCE_YOUR_CALM)).
"""

from __future__ import annotations

RESET_BURST, RESET_RATE = 1000, 100.0
MAX_UNREAD = 1024 * 1024
ENHANCE_YOUR_CALM = 11


class CarrierGuard:
    """The two budgets of one carrier connection, on *clock*."""

    def __init__(self, clock, burst: float = RESET_BURST, rate: float = RESET_RATE, max_unread: int = MAX_UNREAD):
        self.clock = clock
        self.burst, self.rate, self.max_unread = burst, rate, max_unread
        self._resets, self._resets_at = float(burst), clock.seconds()
        self.unread = 0

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._resets = min(self.burst, self._resets + (now - self._resets_at) * self.rate)
        self._resets_at = now

    def reset_before_data(self) -> bool:
        """The peer reset a stream that carried nothing; True when that
        spent the budget (start refusing)."""
        self._refill()
        was = self._resets >= 1
        self._resets -= 1
        return was and self._resets < 1

    def refusing(self) -> bool:
        """Whether new streams are refused now (the budget is spent)."""
        self._refill()
        return self._resets < 1

    def answered(self, count: int) -> bool:
        """*count* bytes were written for the peer while the carrier was
        full; True when that is more than the peer may leave unread."""
        self.unread += count
        return self.unread > self.max_unread

    def drained(self) -> None:
        self.unread = 0
