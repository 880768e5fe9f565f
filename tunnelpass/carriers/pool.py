# -*- test-case-name: tests.test_pool -*-
"""The registry of idle pool connections of one tunnel session (either end).

The client keeps authenticated, idle data connections open; the server
files each one here under its single-use id.  A user connection takes one
with :meth:`IdlePool.take`: at once if one is idle, otherwise it waits (in
arrival order) up to a timeout, while the pool asks the client for more.
Sans-IO apart from Deferreds and an injected clock; "connection" is any
object the caller gives (a protocol), this module never touches sockets.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed


class PoolTimeout(Exception):
    """No pool connection became idle in time (the user connection is refused)."""


class PoolFull(Exception):
    """Too many user connections are already waiting."""


class IdlePool:
    def __init__(self, clock, max_size: int, want_more, timeout: float = 5.0, max_waiters: int = 1024):
        """*want_more(count)* is called when connections should be dialled."""
        self.clock, self.max_size, self.want_more = clock, max_size, want_more
        self.timeout, self.max_waiters = timeout, max_waiters
        self.idle: OrderedDict[bytes, object] = OrderedDict()
        self.waiters: deque[Deferred] = deque()
        self.timeouts = 0

    def add(self, conn_id: bytes, connection) -> bool:
        """File an authenticated idle connection; ``False`` if the pool is full
        (the caller closes it).  A waiting user gets it straight away."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.called:
                waiter.callback((conn_id, connection))
                return True
        if len(self.idle) >= self.max_size:
            return False
        self.idle[conn_id] = connection
        return True

    def has_room(self, conn_id: bytes) -> bool:
        """Whether :meth:`add` would take *conn_id* (a user waits, or the
        pool has space and the id is new)."""
        if conn_id in self.idle:
            return False
        return any(not w.called for w in self.waiters) or len(self.idle) < self.max_size

    def claim(self, conn_id: bytes):
        """Take the idle connection *conn_id* (the peer named it); ``None``
        if it is not idle here (already gone, or never was)."""
        connection = self.idle.pop(conn_id, None)
        if connection is not None and not self.idle:
            self.want_more(1)
        return connection

    def claim_quietly(self, conn_id: bytes):
        """As :meth:`claim`, for retiring a connection: never asks for more."""
        return self.idle.pop(conn_id, None)

    def remove(self, conn_id: bytes) -> None:
        """An idle connection went away (closed by the client, reset, ...)."""
        self.idle.pop(conn_id, None)

    def take(self) -> Deferred:
        """A Deferred firing with ``(conn_id, connection)``, oldest idle first;
        it fails with :class:`PoolTimeout` or :class:`PoolFull`."""
        if self.idle:
            taken = self.idle.popitem(last=False)
            if not self.idle:
                self.want_more(1)
            return succeed(taken)
        if len(self.waiters) >= self.max_waiters:
            # Waiters that already ended (timed out, hung up -- possibly
            # moved here from another session's pool) leave room first.
            self.waiters = deque(w for w in self.waiters if not w.called)
        if len(self.waiters) >= self.max_waiters:
            return fail(PoolFull(f"{self.max_waiters} connections already wait for the pool"))
        waiter = Deferred(lambda d: self._forget(d))
        self.waiters.append(waiter)
        self.want_more(1)  # one more connection per waiting user, never a running total

        def timed_out(failure):
            failure.trap(TimeoutError)
            self.timeouts += 1
            raise PoolTimeout(f"no pool connection within {self.timeout}s")

        return waiter.addTimeout(self.timeout, self.clock).addErrback(timed_out)

    def _forget(self, waiter: Deferred) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def flush(self) -> list:
        """Drop every idle connection; return them for the caller to close."""
        connections = list(self.idle.values())
        self.idle.clear()
        return connections
