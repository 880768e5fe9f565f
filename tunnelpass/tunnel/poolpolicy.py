# -*- test-case-name: tests.test_poolpolicy -*-
"""How many pool connections a client should be dialling.

Sans-IO policy, driven by the client's pool code.  The idle pool follows
measured demand instead of growing by doubling:

* demand is the number of claims (:meth:`used`) per one-second bucket;
* the target idle count is ``min_pool`` plus the busiest bucket of the
  last ``memory`` seconds, within ``[min_pool, max_pool]``; ``memory``
  seconds after the last claim it is back at ``min_pool`` (the caller
  closes the surplus);
* a connection asked for because a user waits (:meth:`requested`: the
  server's POOL, or a local user in the send flow) is dialled at once, on
  top of the target, but is not demand: that user's claim is counted when
  it happens.  So a burst of N users leaves at most ``min_pool + N``
  targeted plus N asked-for connections idle, never a doubling spiral;
* dials are rate-limited by a token bucket (``dial_rate`` per second, burst
  ``dial_burst``) so a misbehaving server or a flapping network cannot make
  the client hammer the server, and at most ``max_in_flight`` are under way
  at once: well under the server's cap on pending handshakes per source
  (256), so a burst never has the client's own pool connections refused.

:meth:`PoolPolicy.to_dial` says how many connections to start now given what
is idle and in flight; :meth:`surplus` how many idle ones to close.
"""

from __future__ import annotations

from collections import deque


class PoolPolicy:
    def __init__(self, clock, min_pool: int, max_pool: int, dial_rate: float = 2000.0,
                 dial_burst: int = 128, memory: float = 30.0, bucket: float = 1.0, max_in_flight: int = 128):
        if not 1 <= min_pool <= max_pool:
            raise ValueError("need 1 <= min_pool <= max_pool")
        if dial_rate <= 0 or dial_burst < 1 or memory <= 0 or bucket <= 0 or max_in_flight < 1:
            raise ValueError("dial_rate, memory and bucket must be positive, dial_burst and max_in_flight "
                             "at least 1")
        self.clock = clock
        self._configured = (min_pool, max_pool)
        self.min_pool, self.max_pool = min_pool, max_pool
        self.dial_rate, self.dial_burst, self.max_in_flight = dial_rate, dial_burst, max_in_flight
        self.memory, self.bucket = memory, bucket
        self._demand: deque[list] = deque()  # [bucket index, claims], oldest first
        self._owed = 0  # connections asked for by waiting users, not dialled yet
        self._tokens = float(dial_burst)
        self._tokens_at = clock.seconds()

    def limit_max_pool(self, limit: int) -> None:
        """Lower the upper bound (the server's WELCOME, or this process's
        descriptor budget).  It can only lower the configured bounds, never
        raise them."""
        configured_min, configured_max = self._configured
        self.max_pool = max(1, min(configured_max, self.max_pool, limit))
        self.min_pool = min(configured_min, self.max_pool)

    def used(self) -> None:
        """A pool connection was taken for a user connection."""
        index = int(self.clock.seconds() // self.bucket)
        demand = self._demand
        if demand and demand[-1][0] >= index:  # same bucket (or the clock stepped back)
            demand[-1][1] += 1
        else:
            demand.append([index, 1])

    def requested(self, count: int) -> None:
        """*count* more connections are wanted now (users wait for them)."""
        if count > 0:
            self._owed = min(self.max_pool, self._owed + count)

    @property
    def demand(self) -> int:
        """The busiest bucket's count within the last ``memory`` seconds."""
        oldest = int((self.clock.seconds() - self.memory) // self.bucket)
        demand = self._demand
        while demand and demand[0][0] <= oldest:
            demand.popleft()
        return max((count for _, count in demand), default=0)

    @property
    def target(self) -> int:
        """Idle connections to aim for."""
        return max(self.min_pool, min(self.max_pool, self.min_pool + self.demand))

    def to_dial(self, idle: int, in_flight: int, room: int | None = None) -> int:
        """Connections to start dialling now; at most *room* (what this
        process has descriptors for), and what could not be dialled for
        waiting users stays owed."""
        now = self.clock.seconds()
        elapsed = max(0.0, now - self._tokens_at)  # a wall clock may step back
        self._tokens = min(float(self.dial_burst), self._tokens + elapsed * self.dial_rate)
        self._tokens_at = now
        wanted = max(0, self.target - idle - in_flight) + self._owed
        allowed = max(0, min(wanted, int(self._tokens), self.max_in_flight - in_flight,
                             wanted if room is None else room))
        self._tokens -= allowed
        self._owed -= min(self._owed, allowed)
        return allowed

    def surplus(self, idle: int) -> int:
        """Idle connections beyond the target, to close (after a quiet spell or FLUSH)."""
        return max(0, idle - self.target)
