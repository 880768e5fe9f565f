# -*- test-case-name: tests.test_pooldial -*-
"""A listener whose user connections ride on streams the far side serves.

The server's public listener (receive flow) and the client's local listener
(send flow) relay each user over a stream instead of dialling a remote.
This is that one "dial": ask the listener's
:class:`~tunnelpass.carriers.stream.IStreamOpener` (:attr:`PoolDialFactory.opener`,
the pool's :class:`~tunnelpass.carriers.opener.PoolOpener`) for a TCP stream
carrying the user's addresses, attach the relay's outbound leg to it, and
refuse the one user -- with a throttled log line -- when none comes.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError

from tunnelpass.ops import connlog
from tunnelpass.relay.outbound import OutboundProtocol, user_addresses
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.carriers.stream import TCP, StreamUnavailable


class PoolDialFactory(TCPForwardFactory):
    limit_name = "slot"
    #: The :class:`~tunnelpass.carriers.stream.IStreamOpener` users' streams come from
    #: (set by the flow's wiring).
    opener = None

    def dial(self, inbound):
        started = self.clock.seconds()
        d = self.opener.open(TCP, user_addresses(inbound))

        def got(stream):
            connlog.claimed(inbound, self.clock.seconds() - started)
            stream.attach(OutboundProtocol(inbound))

        def failed(failure):
            if failure.check(CancelledError):
                return  # the user hung up while waiting
            failure.trap(StreamUnavailable)
            self._refuse(inbound, failure.getErrorMessage())

        d.addCallbacks(got, failed)
        return None if d.called else d

    def _refuse(self, inbound, why: str) -> None:
        if self._refusals.ready():
            self.log.warn("{listener}: user connection refused: {why} ({count} so far)",
                          listener=self.name, why=why, count=self._refusals.take_count(), event="user_refused")
        inbound._pending = None
        connlog.ending(inbound, "no_pool", why)
        if not inbound.closed:
            self.stats.connect_failures += 1
            inbound.transport.loseConnection()
