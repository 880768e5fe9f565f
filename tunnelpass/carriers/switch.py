# -*- test-case-name: tests.test_switch -*-
"""Hand a live connection from one protocol to another.

A tunnel connection starts in a header phase (which kind of connection is
this? is it authenticated?) and then becomes an ordinary relay end.  Rather
than reach into a transport to replace its protocol (TCP and TLS transports
keep it in different private attributes), the transport's protocol stays a
:class:`SwitchingProtocol` that passes every event to its current
*delegate*: one attribute lookup per event, and the relay code stays the
forwarder's, unchanged.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from tunnelpass.carriers.stream import attach


@implementer(IHalfCloseableProtocol)
class SwitchingProtocol(Protocol):
    """Handles the header phase itself (override the ``header_*`` hooks),
    then :meth:`switch_to` another protocol for the rest of the connection."""

    delegate: Protocol | None = None

    def switch_to(self, protocol: Protocol, data: bytes = b"") -> None:
        """From now on *protocol* owns the connection; *data* is what was read
        beyond the header and is delivered to it first -- with the
        connection itself to a protocol that can hold it (``hold_early``):
        a relay may join its remote inside ``connectionMade`` (an idle pool
        connection) and hand both sockets to the zero-copy engine at once,
        and bytes arriving after that would bypass the engine."""
        self.delegate = protocol
        attach(self.transport, protocol, data)

    def dataReceived(self, data: bytes) -> None:
        delegate = self.delegate
        if delegate is not None:
            delegate.dataReceived(data)
        else:
            self.header_received(data)

    def readConnectionLost(self) -> None:
        delegate = self.delegate
        if delegate is None:
            self.transport.loseConnection()  # a header phase never continues after EOF
        elif IHalfCloseableProtocol.providedBy(delegate):
            delegate.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        delegate = self.delegate
        if delegate is not None and IHalfCloseableProtocol.providedBy(delegate):
            delegate.writeConnectionLost()

    def connectionLost(self, reason=None) -> None:
        delegate = self.delegate
        if delegate is not None:
            delegate.connectionLost(reason)
        else:
            self.header_lost(reason)

    # Header phase hooks

    def header_received(self, data: bytes) -> None:
        raise NotImplementedError

    def header_lost(self, reason) -> None:
        """The connection ended before it was handed over."""
