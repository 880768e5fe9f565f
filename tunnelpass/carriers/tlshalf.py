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

Ending abnormally: a TCP FIN without close_notify is truncation, and
Twisted reports it as ``ConnectionLost`` (OpenSSL's "unexpected EOF"), as
any TLS error; the relay then resets the other leg.  ``abortConnection``
sends no close_notify (an abort must never look like a clean end) and,
like every other close here, does nothing once the connection is gone:
Twisted's own methods reach into the discarded OpenSSL connection then
(``AttributeError: 'NoneType' object has no attribute 'shutdown'``).
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.interface import adapter_hooks

from tunnelpass.carriers.stream import IStream, hand_over, stream_of
from tunnelpass.carriers.tls import fingerprint


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
        wrapped = self.wrappedProtocol
        if IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()  # (also when the peer's came first: the relay counts both)
        if self._received_close and self.transport is not None:
            self.transport.loseConnection()  # both directions are done

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
        if self._received_close or self._tlsConnection is None:
            return  # nothing may follow close_notify; never buffer it
        super().dataReceived(data)

    # Closing twice, or after the connection is gone, is a no-op.

    def _shutdownTLS(self) -> None:
        if self._tlsConnection is None:
            return  # connectionLost ran: nothing left to shut down
        super()._shutdownTLS()

    def abortConnection(self) -> None:
        """Drop the connection now: a TCP reset, no close_notify."""
        if self._aborted or self._tlsConnection is None:
            return
        self._aborted = True
        self.disconnecting = True
        if self.transport is not None:
            self.transport.abortConnection()

    def unregisterProducer(self) -> None:
        if self._tlsConnection is None:
            self._producer = None
            return
        super().unregisterProducer()

    def _peer_closed_write(self) -> None:
        self._received_close = True
        wrapped = self.wrappedProtocol
        half_closeable = IHalfCloseableProtocol.providedBy(wrapped)
        # Already closing (both ends closed at once, or we sent ours): finish
        # the TLS shutdown now -- the wrapped protocol's loseConnection would
        # return early and the TCP connection would never close.
        if self._sent_close or self.disconnecting or not half_closeable:
            if self._sent_close and half_closeable and not self.disconnecting:
                wrapped.readConnectionLost()  # its direction ended cleanly too: the relay counts both
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


@implementer(IStream)
class TwistedTLSStream:
    """:class:`~tunnelpass.carriers.stream.IStream` for a connection on Twisted's
    memory-BIO TLS (the client's control connection)."""

    __slots__ = ("transport",)
    secured = True

    def __init__(self, transport):
        self.transport = transport

    def __getattr__(self, name):
        return getattr(self.transport, name)

    @property
    def half_closes(self) -> bool:
        return bool(getattr(type(self.transport), "half_closes", False))

    def attach(self, protocol, data=b""):
        hand_over(self.transport, self.transport.wrappedProtocol, protocol, data)

    def consumer_paused(self) -> bool:
        return bool(getattr(self.transport, "producerPaused", False))

    def unsent(self) -> int:
        transport, total = self.transport, 0
        aggregator = getattr(transport, "_aggregator", None)
        total += sum(len(chunk) for chunk in getattr(aggregator, "_buffer", ()))
        total += sum(len(chunk) for chunk in getattr(transport, "_appSendBuffer", ()))
        lower = transport.transport
        return total + (stream_of(lower).unsent() if lower is not None else 0)

    def native_end(self):
        return None  # the TLS state lives in memory BIOs: no engine can take the socket

    def set_write_buffer(self, size: int) -> None:
        lower = self.transport.transport
        if lower is not None:
            stream_of(lower).set_write_buffer(size)

    def local_fingerprint(self) -> bytes:
        handle = self.transport.getHandle()
        certificate = handle.get_certificate() if handle is not None else None
        return fingerprint(certificate.to_cryptography()) if certificate is not None else b""

    def peer_fingerprint(self) -> bytes:
        certificate = self.transport.getPeerCertificate()
        return fingerprint(certificate.to_cryptography()) if certificate is not None else b""

    def peer_certificates(self) -> list:
        handle = self.transport.getHandle()
        chain = handle.get_peer_cert_chain() if handle is not None else None
        return [c.to_cryptography() for c in chain or ()]


def _adapt(interface, transport):
    if interface is IStream and isinstance(transport, TLSMemoryBIOProtocol) and not IStream.providedBy(transport):
        return TwistedTLSStream(transport)
    return None


adapter_hooks.append(_adapt)
