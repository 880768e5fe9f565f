# -*- test-case-name: tests.test_tlssocket -*-
"""TLS done by OpenSSL on the socket itself: the tunnel's TLS carrier.

A pyOpenSSL ``SSL.Connection`` owns the socket (socket BIO) and reads and
writes it directly, driven by the reactor's readiness events; the
transport is Twisted's TCP transport (``tcp.Server`` / ``tcp.Client``)
with its read, write and close paths going through OpenSSL, so Twisted's
write buffer, producers, ``loseConnection``, ``abortConnection`` and
addresses work as for plain TCP.  pyOpenSSL rather than :mod:`ssl`: its
``shutdown()`` sends close_notify once and reading goes on (half-close).

* Reads: whole records into one shared buffer, up to :data:`READ_LIMIT`
  per readiness event, then one ``dataReceived``.
* Half-close: ``loseWriteConnection`` sends close_notify (RFC 8446 6.1),
  reading goes on; a received close_notify is ``readConnectionLost``;
  once both have crossed the socket closes with ``ConnectionDone``.
* Abnormal ends: a TCP FIN without close_notify, a reset, a TLS error end
  the connection with ``ConnectionLost`` or the ``SSL.Error`` (a relay
  resets the other leg); ``abortConnection`` sends no close_notify (RST).

:class:`TLSServer` (the tunnel listener's) peeks at the first byte
(``MSG_PEEK``): TLS for a TLS record at a TLS server, else plain TCP (the
gate answers it).  :func:`connect_tls` dials a :class:`TLSClient`.  Both
are their own :class:`~tunnelpass.carriers.stream.IStream`.
"""

from __future__ import annotations

import errno
import socket

from OpenSSL import SSL
from twisted.internet import error, main, tcp
from twisted.python.failure import Failure
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from zope.interface import implementer

from tunnelpass.carriers.nativeend import TLSEnd
from tunnelpass.carriers.stream import IStream, TCPStream, socket_unsent, twisted_buffered
from tunnelpass.carriers.tls import fingerprint

#: Plaintext delivered per readiness event at most (one ``dataReceived``).
READ_LIMIT = 256 * 1024
#: A TLS record's plaintext at most: each read asks for a whole record, so
#: OpenSSL never holds decrypted bytes that no readiness event announces.
RECORD = 16 * 1024
TLS_RECORD = 0x16
_BUFFER = memoryview(bytearray(READ_LIMIT + RECORD))  # shared: one read runs at a time


def _lost_after_handshake(e: SSL.Error) -> Exception:
    """How a read or write failure after the handshake ends the connection:
    a cut without close_notify or a reset is ``ConnectionLost`` (as
    Twisted's TLS reports it), any other TLS error stays itself."""
    if isinstance(e, SSL.ZeroReturnError):  # writing after the peer closed both ways
        return error.ConnectionLost("the peer closed the TLS connection")
    if isinstance(e, SSL.SysCallError):
        code, text = (e.args + (None, None))[:2]
        if code in (-1, 0) or code == errno.ECONNRESET or code == errno.EPIPE:
            return error.ConnectionLost(f"TLS connection cut: {text}")
        return error.ConnectionLost(str(text))
    reasons = [entry[-1] for entry in (e.args[0] if e.args and isinstance(e.args[0], list) else [])
               if isinstance(entry, tuple) and entry]
    if any("unexpected eof" in str(r) for r in reasons):
        return error.ConnectionLost("TLS connection cut without close_notify")
    return e


@implementer(IStream)
class TLSSocketMixin:
    """The TLS read, write and close paths of a TCP transport (mixed in
    before ``tcp.Server`` / ``tcp.Client``).  ``_tls`` is None while the
    connection is plain (a server that has not peeked yet, or decided on
    plain): then every path is Twisted's TCP one."""

    half_closes = True
    secured = None  # None plain, False handshaking, True secured
    _tls = None
    _handshaking = False
    _sent_close = False
    _received_close = False
    _read_paused = False
    _read_wants_write = False  # SSL_read must write first: wait for writable
    _write_wants_read = False  # SSL_write must read first: wait for readable
    _close_pending = None  # "half" / "full": close_notify did not fit; retry when writable
    _check = None  # a client's post-handshake identity check (tls=2 hostname)

    def _start_tls(self, connection: SSL.Connection) -> None:
        self._tls = connection
        self.secured = False
        self._handshaking = True

    # Reading

    def doRead(self):
        if self._tls is None:
            return tcp.Connection.doRead(self)
        if self._handshaking:
            return self._handshake()
        if self._write_wants_read:
            self._write_wants_read = False
            self.startWriting()
            if self._read_paused:
                self.stopReading()
                return None
        if self._received_close:
            self.stopReading()  # nothing follows close_notify
            return None
        return self._read_records()

    def _read_records(self):
        tls, view, total, why = self._tls, _BUFFER, 0, None
        while total < READ_LIMIT:
            try:
                total += tls.recv_into(view[total:], RECORD)
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                self._read_wants_write = True
                self.stopReading()
                self.startWriting()
                break
            except SSL.ZeroReturnError:
                self._received_close = True
                why = main.CONNECTION_DONE
                break
            except SSL.Error as e:
                why = _lost_after_handshake(e)
                break
        if total:
            self.protocol.dataReceived(bytes(view[:total]))
        return why

    def readConnectionLost(self, reason) -> None:
        """close_notify arrived (the reactor has stopped reading)."""
        if self._tls is None:
            return tcp.Connection.readConnectionLost(self, reason)
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is None:
            self.loseConnection()  # close_notify in return, after what is buffered
            return None
        try:
            half.readConnectionLost()
        except BaseException:
            self.connectionLost(reason)
            raise
        if self._sent_close and self.connected:
            self.connectionLost(reason)  # both close_notify alerts have crossed
        return None

    def pauseProducing(self) -> None:
        self._read_paused = True
        if not self._handshaking:
            tcp.Connection.pauseProducing(self)

    def resumeProducing(self) -> None:
        self._read_paused = False
        tcp.Connection.resumeProducing(self)
        if self._tls is not None and not self._handshaking and self.connected and self._tls.pending():
            self.reactor.callLater(0, self._read_now)

    def _read_now(self) -> None:
        """Read what OpenSSL already holds (no readiness event will say so)."""
        if self.connected and not self._read_paused and not self.disconnected:
            why = self.doRead()
            if why:  # what the reactor does with a doRead result, done here
                self.stopReading()
                if isinstance(why, error.ConnectionDone):
                    self.readConnectionLost(Failure(why))  # close_notify: a half-close
                else:
                    self.stopWriting()
                    self.connectionLost(Failure(why))

    # Handshake

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self.stopWriting()
            self.startReading()
            return None
        except SSL.WantWriteError:
            self.stopReading()
            self.startWriting()
            return None
        except SSL.Error as e:
            return e
        self._handshaking = False
        if self._check is not None:
            try:
                self._check(self._tls)
            except Exception as e:  # service_identity.VerificationError: a name mismatch
                return e
        self.secured = True
        if self._read_paused or self.disconnecting:
            self.stopReading()
        else:
            self.startReading()
        if self.dataBuffer or self._tempDataLen or self._writeDisconnecting or self.disconnecting:
            self.startWriting()
        else:
            self.stopWriting()
        listener = IHandshakeListener(self.protocol, None)
        if listener is not None:
            listener.handshakeCompleted()
        return None

    # Writing and closing

    def doWrite(self):
        if self._tls is None:
            return tcp.Connection.doWrite(self)
        if self._handshaking:
            if self.disconnecting:
                return main.CONNECTION_DONE  # closed before TLS began: nothing to keep
            return self._handshake()
        if self._read_wants_write:
            self._read_wants_write = False
            if not self._read_paused:
                self.startReading()
            self.reactor.callLater(0, self._read_now)
        if self._write_wants_read:
            self.stopWriting()
            return None
        if self._close_pending is not None:
            return self._close_notify(self._close_pending)
        return tcp.Connection.doWrite(self)

    def writeSomeData(self, data):
        if self._tls is None:
            return tcp.Connection.writeSomeData(self, data)
        if self._handshaking or not data:
            return 0  # (Twisted calls this with nothing to write, too; SSL_write of 0 bytes is an error)
        try:
            return self._tls.send(memoryview(data)[:self.SEND_LIMIT])
        except SSL.WantWriteError:
            return 0
        except SSL.WantReadError:
            self._write_wants_read = True
            self.startReading()
            return 0
        except SSL.Error as e:
            return _lost_after_handshake(e)

    def _closeWriteConnection(self):
        if self._tls is None:
            return tcp.Connection._closeWriteConnection(self)
        return self._close_notify("half")

    def _postLoseConnection(self):
        if self._tls is None or self._handshaking or self._sent_close:
            return main.CONNECTION_DONE
        return self._close_notify("full")

    def _close_notify(self, kind: str):
        """Send close_notify (once); *kind* "half" keeps reading, "full"
        then closes the socket."""
        if not self._sent_close:
            try:
                self._tls.shutdown()
            except (SSL.WantWriteError, SSL.WantReadError):
                self._close_pending = kind  # the alert waits in OpenSSL: retry when writable
                self.startWriting()
                return None
            except SSL.Error as e:
                return _lost_after_handshake(e)
            self._sent_close = True
        self._close_pending = None
        self.stopWriting()
        if kind == "full":
            return main.CONNECTION_DONE
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.writeConnectionLost()
        if self._received_close:
            return main.CONNECTION_DONE  # both close_notify alerts have crossed
        return None

    def connectionLost(self, reason) -> None:
        tcp.Connection.connectionLost(self, reason)
        self._check = None

    # ISSLTransport and IStream

    def getPeerCertificate(self):
        return self._tls.get_peer_certificate() if self._tls is not None else None

    def attach(self, protocol, data=b""):
        TCPStream(self).attach(protocol, data)

    def consumer_paused(self) -> bool:
        return bool(self.producerPaused)

    def unsent(self) -> int:
        return twisted_buffered(self) + socket_unsent(self.socket)

    def native_end(self):
        if self._tls is None:
            return TCPStream(self).native_end()
        if (self._handshaking or self._close_pending or self._read_wants_write or self._write_wants_read
                or self._received_close or self._sent_close  # an engine would never hear of it again
                or twisted_buffered(self) or not self.connected or self.disconnecting):
            return None
        return TLSEnd(self, self._tls)

    def set_write_buffer(self, size: int) -> None:
        self.bufferSize = size

    def local_fingerprint(self) -> bytes:
        certificate = self._tls.get_certificate() if self._tls is not None else None
        return fingerprint(certificate.to_cryptography()) if certificate is not None else b""

    def peer_fingerprint(self) -> bytes:
        certificate = self.getPeerCertificate()
        return fingerprint(certificate.to_cryptography()) if certificate is not None else b""

    def peer_certificates(self) -> list:
        chain = self._tls.get_peer_cert_chain() if self._tls is not None else None
        return [c.to_cryptography() for c in chain or ()]

    def tls_connection(self):
        """The ``SSL.Connection`` (None while plain), for diagnostics."""
        return self._tls


class TLSServer(TLSSocketMixin, tcp.Server):
    """An accepted tunnel connection: peeks at the first byte, then TLS
    (a TLS record, and the listening port has a context) or plain TCP.

    The port's ``tls_context()`` is asked at that moment, so a reloaded
    certificate applies to new connections and live ones keep theirs."""

    _undecided = False

    def __init__(self, sock, protocol, client, server, sessionno, reactor):
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        self._undecided = getattr(server, "tls_context", None) is not None

    def doRead(self):
        if self._undecided:
            return self._peek()
        return TLSSocketMixin.doRead(self)

    def _peek(self):
        try:
            first = self.socket.recv(1, socket.MSG_PEEK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if not first:
            return main.CONNECTION_DONE
        self._undecided = False
        context = self.server.tls_context() if first[0] == TLS_RECORD else None
        if context is None:
            return tcp.Connection.doRead(self)  # plain: the gate answers it
        connection = SSL.Connection(context, self.socket)
        connection.set_accept_state()
        self._start_tls(connection)
        return self._handshake()


class TLSClient(TLSSocketMixin, tcp.Client):
    """A dialled connection that starts TLS once TCP is connected, with the
    connection and identity check of its *creator* (see
    :class:`tunnelpass.carriers.tls.PinnedClientCreator`)."""

    def __init__(self, host, port, bindAddress, connector, reactor, creator):
        self.creator = creator
        super().__init__(host, port, bindAddress, connector, reactor)

    def _connectDone(self):
        connection = self.creator.socket_connection(self.socket)
        self._check = self.creator.check
        self._start_tls(connection)
        super()._connectDone()
        if self.connected and not self.disconnecting:
            self.startWriting()  # the ClientHello


class TLSConnector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, bindAddress, reactor, creator):
        super().__init__(host, port, factory, timeout, bindAddress, reactor)
        self.creator = creator

    def _makeTransport(self):
        return TLSClient(self.host, self.port, self.bindAddress, self, self.reactor, self.creator)


def connect_tls(reactor, host: str, port: int, factory, creator, timeout: float = 30, bind=None):
    """``reactor.connectTCP`` with TLS on the socket (a real POSIX reactor)."""
    connector = TLSConnector(host, port, factory, timeout, bind, reactor, creator)
    connector.connect()
    return connector


class TLSPort(tcp.Port):
    """A listening port whose connections are :class:`TLSServer`;
    *tls_context* returns the current ``SSL.Context`` (None: plain)."""

    transport = TLSServer

    def __init__(self, port, factory, backlog, interface, reactor, tls_context):
        super().__init__(port, factory, backlog, interface, reactor)
        self.tls_context = tls_context


def listen_tls(reactor, port: int, factory, tls_context, backlog: int = 50, interface: str = "127.0.0.1"):
    listening = TLSPort(port, factory, backlog, interface, reactor, tls_context)
    listening.startListening()
    return listening

