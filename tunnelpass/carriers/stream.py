# -*- test-case-name: tests.test_stream -*-
"""The stream interface: what the relay, the pool and the UDP sessions know
of a carrier.

A *stream* is one tunnelled, TCP-like byte stream: a whole pool
connection (plain TCP, or TLS done on the socket), later one stream of a
multiplexed connection.  Its user is a Twisted protocol
(``IProtocol`` + ``IHalfCloseableProtocol``: ``dataReceived``,
``readConnectionLost`` for the peer's end of data, ``connectionLost``),
attached with :meth:`IStream.attach`; the user writes to the stream as to
any Twisted transport.  Everything a relay needs beyond Twisted's transport
interfaces is asked here, never found by type checks or private attributes:

* whether a half-close keeps the other direction open (:attr:`IStream.half_closes`),
* whether the stream's own consumer has paused it (:meth:`IStream.consumer_paused`),
* how much written data is not acknowledged yet (:meth:`IStream.unsent`),
* the socket itself for a relay engine that moves bytes without Twisted
  (:meth:`IStream.native_end`: ``os.splice`` for two plain sockets, the
  copy pump when one end is TLS),
* the certificates each side saw (channel binding, diagnostics).

Ordinary Twisted TCP transports (the user's accepted connection, a dialled
target) get these through :func:`stream_of`, which adapts them; carriers
implement :class:`IStream` themselves.

:class:`IStreamOpener` is the side that listens for users: it claims a
stream and announces what it carries (``open(kind, addresses)``).
:class:`IStreamAcceptor` is the side that dials ``--target``: it is told of
each stream the far side opened.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from twisted.internet import tcp
from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport
from zope.interface import Attribute, Interface, implementer
from zope.interface.interface import adapter_hooks

#: Stream kinds a stream opener announces.
TCP = "tcp"
UDP = "udp"
KINDS = (TCP, UDP)


class StreamUnavailable(Exception):
    """No stream could be had (no session, the pool stayed empty, too many
    waiting); the message says why, for the refused user's log line."""


class IStream(ITCPTransport, IPushProducer, IConsumer):
    """A tunnelled byte stream, as its user writes to and controls it.

    Writes, ``loseConnection`` (a clean end after what is buffered),
    ``loseWriteConnection`` (half-close), ``abortConnection`` (an end that
    the peer sees as abnormal: RST, never a clean EOF), pause/resume of
    reading, ``registerProducer`` for backpressure on writes, addresses:
    Twisted's own transport interfaces.  What follows is the rest."""

    half_closes = Attribute(
        "True when loseWriteConnection ends only this side's direction (TCP FIN, TLS close_notify) "
        "and reading goes on; False when it would have to close both.")

    secured = Attribute(
        "None for a stream without TLS; False while its TLS handshake runs; True once it is done.")

    def attach(protocol, data=b""):
        """Hand the stream to *protocol* from now on (``makeConnection``);
        *data*, read ahead while the stream was being set up, is delivered
        first -- to ``protocol.hold_early(data)`` when it has one (a relay
        that may move both sockets into an engine at once), else as its
        first ``dataReceived``."""

    def consumer_paused():
        """Whether this stream's write side is full and has paused its
        registered producer (resuming that producer behind its back would
        let the buffer grow without bound)."""

    def unsent():
        """Bytes written to the stream that the peer has not acknowledged
        yet (every buffer on the way, the kernel's send queue included)."""

    def native_end():
        """An :class:`INativeEnd` for this stream's socket, for a relay
        engine that moves bytes without Twisted; None when the stream is
        not a socket of its own (a multiplexed stream), is still in its
        handshake, or holds unwritten data an engine would skip."""

    def set_write_buffer(size):
        """Let *size* unsent bytes build up before the registered producer
        is paused (a datagram stream takes bursts, a byte relay does not)."""

    def local_fingerprint():
        """SHA-256 of the certificate this side presented (``b""`` without TLS)."""

    def peer_fingerprint():
        """SHA-256 of the certificate the peer presented (``b""`` without TLS)."""

    def peer_certificates():
        """The peer's certificate chain as ``cryptography`` certificates,
        leaf first (empty without TLS or before the peer sent one)."""


class IStreamOpener(Interface):
    """The side that listens for users claims streams through this."""

    def open(kind, addresses):
        """A Deferred firing with an :class:`IStream` that the far side has
        been told carries *kind* (:data:`TCP` or :data:`UDP`) for the user
        at *addresses* (``(source, destination)`` address pairs, or None);
        it fails with :class:`StreamUnavailable`.  Cancelling it (the user
        hung up while waiting) gives up the claim."""


class IStreamAcceptor(Interface):
    """The side that dials ``--target`` is told of each stream the far side
    opened through this."""

    def stream_accepted(kind, addresses, stream, data):
        """The far side opened *stream* for *kind* with the user's
        *addresses*; *data* is what was read after the announcement.  The
        acceptor attaches a protocol to the stream, or aborts it."""


class INativeEnd(Interface):
    """One socket as a relay engine drives it: plain TCP, or TLS done by
    OpenSSL on the socket itself.  The engine registers :meth:`fileno`
    with the reactor and calls these when it is readable or writable.

    Every call is non-blocking.  :class:`NeedRead` / :class:`NeedWrite`
    say which readiness to wait for before retrying (TLS may need to read
    to write and the reverse); a plain ``BlockingIOError`` (a socket's
    EAGAIN) means the call's own readiness (readable for a read, writable
    for a write); any other ``OSError`` is an abnormal end."""

    transport = Attribute("The Twisted transport the socket belongs to: it is closed through it.")
    kind = Attribute('"socket" or "tls"')

    def fileno():
        """The socket's descriptor."""

    def recv_into(buffer):
        """Read into *buffer* (a writable memoryview); the count, or 0 for a
        clean end of the peer's data (TCP FIN; TLS close_notify).  A TLS
        stream cut without close_notify raises ``ConnectionResetError``."""

    def send(data):
        """Write from *data*; the count written (maybe less than all)."""

    def pending():
        """Bytes already read and decrypted inside the TLS library (no
        socket readiness will announce them); 0 for a plain socket."""

    def shutdown_write():
        """Send this side's clean end of data (FIN; TLS close_notify alone:
        a FIN after it would end both directions for a peer on Twisted's
        TLS); True once sent, False to retry when writable."""

    def unsent():
        """Bytes in the kernel's send queue not yet acknowledged by the peer."""


class NeedRead(BlockingIOError):
    """Retry once the socket is readable."""


class NeedWrite(BlockingIOError):
    """Retry once the socket is writable."""


def socket_unsent(sock) -> int:
    """Bytes in *sock*'s kernel send queue the peer has not acknowledged
    (``SIOCOUTQ``); 0 for a closed socket or where it cannot be told."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return struct.unpack("i", raw)[0]


def twisted_buffered(transport) -> int:
    """Bytes in a Twisted ``FileDescriptor``'s write buffer."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def stream_of(transport) -> IStream:
    """*transport* as an :class:`IStream` (itself, when it is one)."""
    return IStream(transport)


@implementer(IStream)
class TCPStream:
    """:class:`IStream` for Twisted's own TCP transport (a user's accepted
    connection, a dialled target, a plain pool connection)."""

    __slots__ = ("transport",)
    half_closes = True
    secured = None

    def __init__(self, transport: tcp.Connection):
        self.transport = transport

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def attach(self, protocol, data=b""):
        hand_over(self.transport, self.transport.protocol, protocol, data)

    def consumer_paused(self) -> bool:
        return bool(self.transport.producerPaused)

    def unsent(self) -> int:
        return twisted_buffered(self.transport) + socket_unsent(self.transport.socket)

    def native_end(self):
        transport = self.transport
        if twisted_buffered(transport) or not transport.connected or transport.disconnecting:
            return None
        sock = transport.socket
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            return None
        return SocketEnd(transport)

    def set_write_buffer(self, size: int) -> None:
        self.transport.bufferSize = size

    def local_fingerprint(self) -> bytes:
        return b""

    def peer_fingerprint(self) -> bytes:
        return b""

    def peer_certificates(self) -> list:
        return []


def write_now(stream, data: bytes) -> None:
    """Write *data* to *stream*: straight to its socket when it offers one
    and nothing is buffered before it, the rest (or all, for a stream
    without a socket of its own) through the stream's ordinary write.

    Twisted's own write only buffers: the bytes leave on a later reactor
    turn, after two changes to the poller's interest in the socket.  On a
    request/response relay that is a turn and two system calls per message
    per hop; here it is one ``send``.  A send error is left to the
    ordinary write, which meets it again and ends the stream."""
    sent = 0
    end = stream.native_end()
    if end is not None:
        try:
            sent = end.send(data)
        except OSError:  # EAGAIN, NeedRead/NeedWrite, or an error the ordinary write reports
            sent = 0
    if sent < len(data):
        stream.write(data[sent:] if sent else data)


def attach(transport, protocol, data: bytes = b"") -> None:
    """Make *protocol* the owner of *transport*, delivering *data* first
    (see :meth:`IStream.attach`)."""
    hold = getattr(protocol, "hold_early", None)
    if data and hold is not None:
        hold(data)
        data = b""
    protocol.makeConnection(transport)
    if data and transport.connected:
        protocol.dataReceived(data)


def hand_over(transport, owner, protocol, data: bytes = b"") -> None:
    """:meth:`IStream.attach` for a *transport* whose protocol is *owner*:
    through the owner's ``switch_to`` when it is a connection whose header
    phase is over (it keeps passing the transport's events on), else
    straight to *protocol*."""
    switch = getattr(owner, "switch_to", None)
    if switch is not None:
        switch(protocol, data)
    else:
        attach(transport, protocol, data)


def _adapt(interface, transport):
    if interface is IStream and isinstance(transport, tcp.Connection) and not IStream.providedBy(transport):
        return TCPStream(transport)
    return None


adapter_hooks.append(_adapt)


def SocketEnd(transport):  # noqa: N802 - stands for the class until its module is loaded
    """:class:`tunnelpass.carriers.nativeend.SocketEnd`, imported on first use
    (that module implements this one's interfaces), then bound here for good:
    an import inside ``native_end()`` ran the import machinery on every
    relayed message."""
    global SocketEnd
    from tunnelpass.carriers.nativeend import SocketEnd as end_class

    SocketEnd = end_class
    return end_class(transport)
