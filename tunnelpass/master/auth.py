# -*- test-case-name: tests.test_master_api -*-
"""The master's API key: generation, the stored hash, the check, and a
per-source limit on failed keys.

Only the SHA-256 hex of the key is kept (in the store and here); the key
itself is shown once, when it is made.  A correct key is 64 hex digits of
``secrets`` randomness, so a plain hash (no salt, no stretching) cannot be
searched: there is nothing guessable to search for.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
from collections import OrderedDict

from twisted.logger import Logger


def new_key() -> str:
    """A fresh API key: 32 random bytes, hex."""
    return secrets.token_hex(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex of *key*, which is all the master stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyHolder:
    """The hash of the current API key; ``replace`` swaps it on rotation
    (the registry calls it once the new hash is committed)."""

    def __init__(self, key_hash: str):
        self._hash = key_hash

    def check(self, presented: str) -> bool:
        """Whether *presented* is the current key (constant time on the
        hashes, so the comparison leaks nothing about the stored one)."""
        if not presented or not self._hash:
            return False
        try:
            presented_hash = hash_key(presented)
        except UnicodeError:
            return False
        return hmac.compare_digest(presented_hash, self._hash)

    def replace(self, key_hash: str) -> None:
        self._hash = key_hash


class _Source:
    __slots__ = ("failures", "logged_at", "unlogged")

    def __init__(self):
        self.failures: list[float] = []
        self.logged_at: float | None = None
        self.unlogged = 0


class FailureLimiter:
    """Failed API keys per source: after *limit* failures within *window*
    seconds, further wrong keys from that source are answered 429 until the
    oldest of those failures is *window* seconds old.

    The key is always checked first, and a correct key is always accepted,
    even from a limited source: on the default loopback bind every local
    process shares 127.0.0.1 (behind a reverse proxy, every user shares the
    proxy's address), and refusing the right key there would let anyone on
    the host lock the operator out.  With 256 random bits a guess cannot
    succeed anyway; the limit slows guessing and keeps the log readable.

    A source is an IPv4 address or an IPv6 /64 (one host's share of a
    network).  The table holds at most *max_sources* sources; the least
    recently failing one is forgotten first (that bounds memory; a new
    address costs the attacker one more address).

    Rejections are logged (``event="api_key_rejected"``) at most once per
    *log_interval* seconds per source, with the number of failures since
    the previous line, and at most *max_lines* lines per *log_interval* for
    all sources together (the others' counts carry over to their next line).
    """

    log = Logger()

    def __init__(self, clock, limit: int = 10, window: float = 60.0,
                 max_sources: int = 4096, log_interval: float = 10.0, max_lines: int = 10):
        self._clock = clock
        self.limit, self.window = limit, window
        self.max_sources, self.log_interval, self.max_lines = max_sources, log_interval, max_lines
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._lines_since, self._lines = 0.0, 0

    def __len__(self) -> int:
        return len(self._sources)

    def _recent(self, source: str, now: float) -> _Source | None:
        entry = self._sources.get(source_key(source))
        if entry is not None:
            entry.failures = [t for t in entry.failures if now - t < self.window]
        return entry

    def retry_after(self, source: str) -> int | None:
        """Seconds (rounded up, at least 1) until *source* may try again,
        or ``None`` when it is not limited."""
        now = self._clock.seconds()
        entry = self._recent(source, now)
        if entry is None or len(entry.failures) < self.limit:
            return None
        oldest = entry.failures[-self.limit]
        return max(1, math.ceil(oldest + self.window - now))

    def failed(self, source: str, reason: str) -> None:
        """Record one failed key from *source* and log it (throttled)."""
        now = self._clock.seconds()
        entry = self._recent(source, now)
        key = source_key(source)
        if entry is None:
            entry = self._sources[key] = _Source()
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        entry.failures.append(now)
        del entry.failures[:-self.limit]
        entry.unlogged += 1
        if now - self._lines_since >= self.log_interval:
            self._lines_since, self._lines = now, 0
        if (entry.logged_at is None or now - entry.logged_at >= self.log_interval) and self._lines < self.max_lines:
            self._lines += 1
            self.log.warn(
                "API key rejected from {source}: {reason} ({count} since the last report)",
                event="api_key_rejected", source=source, reason=reason,
                count=entry.unlogged)
            entry.logged_at, entry.unlogged = now, 0


def source_key(host: str) -> str:
    """What the limiter counts by: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
