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
    """Failed API keys per source address: after *limit* failures within
    *window* seconds, the source is refused (429) until the oldest of those
    failures is *window* seconds old.

    While a source is limited, even a correct key from it is refused, and
    the key is not checked at all.  Otherwise the limit would be an oracle:
    an attacker guessing keys could keep guessing and learn which guess
    was right by the answer that is not 429.  Refusing everything is also
    what makes the limit cheap: a limited source costs one lookup.

    The table holds at most *max_sources* sources; the least recently
    failing one is forgotten first (its failures are then as good as
    expired, which bounds memory rather than grants access: a new source
    address costs the attacker one more address).

    Rejections are logged (``event="api_key_rejected"``) at most once per
    *log_interval* seconds per source, with the number of failures since
    the previous line.
    """

    log = Logger()

    def __init__(self, clock, limit: int = 10, window: float = 60.0,
                 max_sources: int = 4096, log_interval: float = 10.0):
        self._clock = clock
        self.limit, self.window = limit, window
        self.max_sources, self.log_interval = max_sources, log_interval
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def _recent(self, source: str, now: float) -> _Source | None:
        entry = self._sources.get(source)
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
        if entry is None:
            entry = self._sources[source] = _Source()
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        entry.failures.append(now)
        del entry.failures[:-self.limit]
        entry.unlogged += 1
        if entry.logged_at is None or now - entry.logged_at >= self.log_interval:
            self.log.warn(
                "API key rejected from {source}: {reason} ({count} since the last report)",
                event="api_key_rejected", source=source, reason=reason,
                count=entry.unlogged)
            entry.logged_at, entry.unlogged = now, 0
