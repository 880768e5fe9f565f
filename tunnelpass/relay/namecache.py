# -*- test-case-name: tests.test_namecache -*-
"""The per-instance cache of target name resolutions (``--dns``, NodePass's ``dns=``).

A target given by name is looked up once per TTL instead of on every
connection: a busy tunnel in front of ``db.internal:5432`` would otherwise
ask the resolver thousands of times a minute, and a slow or flaky resolver
would slow or fail every connection.  NodePass users expect this cache (its
``dns=5m`` default is ours).

* IP literals bypass the cache (and the resolver) entirely.
* A lookup already running is shared: connections that come while a name
  resolves wait for that one answer instead of each starting a query.
* A failed lookup is **not** cached: the next connection asks again (a
  resolver that failed once is often back a moment later, and caching the
  failure would refuse users for a whole TTL).  Everyone waiting on the
  failed lookup gets its failure.
* ``ttl == 0`` disables caching: every connection queries anew (concurrent
  ones still share a running lookup).
* The cache is bounded (:data:`MAX_ENTRIES` names); when full, the entry
  stored first is dropped.  Targets are configured, so this only matters for
  a forwarder with thousands of rules by name.

Sans-IO apart from :func:`system_lookup`: the lookup function and the clock
are injected, so the tests drive time and answers themselves.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

#: NodePass's default TTL for its target name cache (``dns=5m``).
DEFAULT_TTL = 300.0
#: Names kept at most; the oldest entry goes first.
MAX_ENTRIES = 1024

Lookup = Callable[[str], Deferred]


def literal(host: str) -> str | None:
    """*host* normalized if it is an IP literal, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class NameCache:
    """Name -> addresses (IP literal strings, IPv4 and IPv6 in the
    resolver's order), each entry good for *ttl* seconds of *clock*.

    *lookup(host)* returns a Deferred firing with a non-empty list of IP
    strings, or failing.
    """

    def __init__(self, lookup: Lookup, clock, ttl: float = DEFAULT_TTL, max_entries: int = MAX_ENTRIES):
        self.lookup = lookup
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._running: dict[str, list[Deferred]] = {}
        #: Lookups started (queries sent to the resolver), and answers from the cache.
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, host: str) -> Deferred:
        """A Deferred firing with *host*'s addresses (a list, never empty).

        Cancelling it stops that one caller waiting; a shared lookup goes on
        for the others (and still fills the cache)."""
        ip = literal(host)
        if ip is not None:
            return succeed([ip])
        key = host.lower().rstrip(".")
        entry = self._entries.get(key)
        if entry is not None:
            expires, addresses = entry
            if self.clock.seconds() < expires:
                self.hits += 1
                return succeed(list(addresses))
            del self._entries[key]
        waiter = Deferred()
        waiters = self._running.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[key] = [waiter]
        self.lookups += 1
        maybeDeferred(self.lookup, host).addCallbacks(self._answered, self._failed,
                                                      callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def forget(self, host: str) -> None:
        """Drop *host*'s cached answer: none of its addresses answered, and
        a name that moved (DNS failover) must not be dialled at its old
        address until the TTL runs out."""
        self._entries.pop(host.lower().rstrip("."), None)

    def _answered(self, addresses, key: str) -> None:
        addresses = list(addresses)
        if not addresses:
            self._failed(DNSLookupError(f"no address for {key}"), key)
            return
        if self.ttl > 0:
            self._entries[key] = (self.clock.seconds() + self.ttl, addresses)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        for waiter in self._running.pop(key, []):
            if not waiter.called:  # a cancelled waiter has already fired
                waiter.callback(list(addresses))

    def _failed(self, reason, key: str) -> None:
        for waiter in self._running.pop(key, []):
            if not waiter.called:
                waiter.errback(reason)


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self, host: str):
        self.host = host
        self.addresses: list[str] = []
        self.done = Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)) and address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.addresses:
            self.done.callback(self.addresses)
        else:
            self.done.errback(DNSLookupError(f"cannot resolve {self.host}: no address found"))


def system_lookup(reactor) -> Lookup:
    """A lookup through ``reactor.nameResolver`` (the system resolver, run in
    the reactor's thread pool, so the reactor never blocks on DNS); IPv4 and
    IPv6 addresses both."""

    def lookup(host: str) -> Deferred:
        collector = _Collector(host)
        reactor.nameResolver.resolveHostName(collector, host, 0)
        return collector.done

    return lookup
