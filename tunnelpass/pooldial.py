# -*- test-case-name: tests.test_server -*-
"""A listener whose user connections take idle pool connections.

The server's public listener (receive flow) and the client's local listener
(send flow) both relay each user over an idle, authenticated pool
connection instead of dialling a remote.  This is that one "dial": take
from the pool (waiting up to ``--pool-timeout`` when it is empty), skip a
connection that closed while idle, and refuse the one user -- with a
throttled log line -- when no connection comes.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError

from tunnelpass import connlog
from tunnelpass.pool import PoolFull, PoolTimeout
from tunnelpass.relay import TCPForwardFactory


class PoolDialFactory(TCPForwardFactory):
    limit_name = "slot"
    #: Why a user is refused when there is no pool at all.
    unavailable = "not connected"

    def current_pool(self):
        """The idle pool to take from, or None."""
        raise NotImplementedError

    def use(self, conn_id: bytes, connection, inbound) -> None:
        """Relay *inbound* over the pool *connection* just taken."""
        raise NotImplementedError

    def dial(self, inbound):
        pool = self.current_pool()
        if pool is None:
            self._refuse(inbound, self.unavailable)
            return None
        started = self.clock.seconds()
        d = pool.take()

        def got(taken):
            conn_id, connection = taken
            if not connection.transport.connected:
                # Closed while idle (its removal is underway): try the next
                # one, chained so that a hang-up cancels the new wait.
                return self.dial(inbound)
            connlog.claimed(inbound, self.clock.seconds() - started)
            self.use(conn_id, connection, inbound)

        def failed(failure):
            if failure.check(CancelledError):
                return  # the user hung up while waiting
            failure.trap(PoolTimeout, PoolFull)
            self._refuse(inbound, failure.getErrorMessage())

        d.addCallbacks(got, failed)
        return d

    def _refuse(self, inbound, why: str) -> None:
        if self._refusals.ready():
            self.log.warn("{listener}: user connection refused: {why} ({count} so far)",
                          listener=self.name, why=why, count=self._refusals.take_count(), event="user_refused")
        inbound._pending = None
        connlog.ending(inbound, "no_pool", why)
        if not inbound.closed:
            self.stats.connect_failures += 1
            inbound.transport.loseConnection()
