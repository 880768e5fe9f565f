# -*- test-case-name: tests.test_switch -*-
"""TLS transports that carry a half-close, for tunnel data connections.

A relay passes a FIN from one side to the other (``loseWriteConnection``)
and keeps the other direction open: ``printf req | nc -N`` style clients
and servers that answer after EOF depend on it.  Twisted's TLS transport
only closes both directions at once, so this subclass maps half-close onto
TLS itself: ``loseWriteConnection`` sends close_notify (which ends only the
sender's direction, RFC 8446 section 6.1) and a received close_notify is
delivered as ``readConnectionLost``; the TCP connection closes once both
close_notify alerts have crossed.

It leans on ``TLSMemoryBIOProtocol`` internals (``_tlsConnection``,
``_flushSendBIO``, ``_flushReceiveBIO``), checked against Twisted 26.10;
tests/test_switch.py checks both directions over a real TLS connection and
the end-to-end tests send data, half-close and read the echo at tls=1 and 2.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer


class HalfCloseTLSProtocol(BufferingTLSTransport):
    half_closes = True
    _sent_close = False
    _received_close = False

    def loseWriteConnection(self) -> None:
        """Send close_notify after what is written so far; keep reading."""
        if self._sent_close or self.disconnecting or not self.connected:
            return
        self._aggregator.flush()
        if self._appSendBuffer or not self._handshakeDone:
            self.loseConnection()  # still handshaking: nothing to keep open
            return
        self._sent_close = True
        try:
            self._tlsConnection.shutdown()
        except Error:
            pass
        self._flushSendBIO()
        if self._received_close:
            self.transport.loseConnection()  # both directions are done
            return
        wrapped = self.wrappedProtocol
        if IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection and not self._received_close:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                self._peer_closed_write()
                break
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def dataReceived(self, data: bytes) -> None:
        if self._received_close:
            return  # nothing may follow close_notify; never buffer it
        super().dataReceived(data)

    def _peer_closed_write(self) -> None:
        self._received_close = True
        wrapped = self.wrappedProtocol
        # Already closing (both ends closed at once, or we sent ours): finish
        # the TLS shutdown now -- the wrapped protocol's loseConnection would
        # return early and the TCP connection would never close.
        if self._sent_close or self.disconnecting or not IHalfCloseableProtocol.providedBy(wrapped):
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return
        wrapped.readConnectionLost()


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    protocol = HalfCloseTLSProtocol
    noisy = False


@implementer(IStreamClientEndpoint)
class HalfCloseTLSEndpoint:
    """``wrapClientTLS`` with :class:`HalfCloseTLSProtocol`."""

    def __init__(self, creator, endpoint):
        self.creator, self.endpoint = creator, endpoint

    def connect(self, factory) -> Deferred:
        d = self.endpoint.connect(HalfCloseTLSFactory(self.creator, True, factory))
        d.addCallback(lambda tls_protocol: tls_protocol.wrappedProtocol)
        return d
