# -*- test-case-name: tests.test_poolpolicy -*-
"""How many pool connections a client should be dialling (groundwork for issue 3).

Sans-IO policy, driven by the client's pool code:

* the target idle count starts at ``--min-pool`` and never leaves
  ``[min_pool, max_pool]`` (``max_pool`` comes from the server);
* it doubles when the pool runs dry or the server asks for more (``POOL``),
  and decays by a quarter after each ``shrink_after`` seconds with no
  shortage, back towards ``min_pool``;
* dials are rate-limited by a token bucket (``dial_rate`` per second, burst
  ``dial_burst``) so a misbehaving server or a flapping network cannot make
  the client hammer the server.

:meth:`PoolPolicy.to_dial` says how many connections to start now given what
is idle and in flight; the caller reports :meth:`used`, :meth:`requested`
and calls :meth:`to_dial` again on its tick.
"""

from __future__ import annotations


class PoolPolicy:
    def __init__(self, clock, min_pool: int, max_pool: int, dial_rate: float = 2000.0,
                 dial_burst: int = 128, shrink_after: float = 30.0):
        if not 1 <= min_pool <= max_pool:
            raise ValueError("need 1 <= min_pool <= max_pool")
        if dial_rate <= 0 or dial_burst < 1 or shrink_after <= 0:
            raise ValueError("dial_rate and shrink_after must be positive, dial_burst at least 1")
        self.clock = clock
        self._configured = (min_pool, max_pool)
        self.min_pool, self.max_pool = min_pool, max_pool
        self.dial_rate, self.dial_burst = dial_rate, dial_burst
        self.shrink_after = shrink_after
        self.target = min_pool
        self._tokens = float(dial_burst)
        self._tokens_at = clock.seconds()
        self._last_shortage = clock.seconds()

    def limit_max_pool(self, server_max: int) -> None:
        """The server's WELCOME says how many idle connections it accepts.
        It can only lower this client's own bounds, never raise them."""
        configured_min, configured_max = self._configured
        self.max_pool = max(1, min(configured_max, server_max))
        self.min_pool = min(configured_min, self.max_pool)
        self.target = min(max(self.target, self.min_pool), self.max_pool)

    def used(self, idle_left: int) -> None:
        """A pool connection was taken for a user connection."""
        if idle_left == 0:
            self._grow()

    def requested(self, count: int) -> None:
        """The server asked for *count* more (it had a user waiting)."""
        if count > 0:
            self.target = min(self.max_pool, self.target + count)
            self._last_shortage = self.clock.seconds()

    def _grow(self) -> None:
        self.target = min(self.max_pool, self.target * 2)
        self._last_shortage = self.clock.seconds()

    def to_dial(self, idle: int, in_flight: int) -> int:
        """Connections to start dialling now."""
        now = self.clock.seconds()
        if now - self._last_shortage >= self.shrink_after and self.target > self.min_pool:
            self.target = max(self.min_pool, self.target - max(1, self.target // 4))
            self._last_shortage = now
        elapsed = max(0.0, now - self._tokens_at)  # a wall clock may step back
        self._tokens = min(float(self.dial_burst), self._tokens + elapsed * self.dial_rate)
        self._tokens_at = now
        wanted = max(0, self.target - idle - in_flight)
        allowed = max(0, min(wanted, int(self._tokens)))
        self._tokens -= allowed
        return allowed

    def surplus(self, idle: int) -> int:
        """Idle connections beyond the target, to close (after a shrink or FLUSH)."""
        return max(0, idle - self.target)
