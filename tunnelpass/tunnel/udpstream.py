# -*- test-case-name: tests.test_udptunnel -*-
"""One UDP session over one pool connection: what both sides share.

:class:`DatagramStream` is the pool connection carrying a session's
datagrams, length-prefixed (:mod:`tunnelpass.wire.datagrams`); it drops rather
than queues once its transport holds ``STREAM_BUFFER`` unsent bytes.
``_Session`` is the base of both sides' sessions (idle expiry,
``--udp-buffer``/``--rate`` admission, closing once), and ``_make_room``
applies ``--max-sessions``/``--slot`` the same way on both sides, evicting
quiet sessions (:class:`~tunnelpass.relay.sessiontable.SessionTable`).

The ingress side is :mod:`tunnelpass.tunnel.udptunnel`, the egress side
:mod:`tunnelpass.tunnel.udpegress`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tunnelpass.wire.datagrams import DatagramDecoder, frame
from tunnelpass.relay.sessiontable import ALL_ACTIVE, SessionTable
from tunnelpass.carriers.stream import stream_of
from tunnelpass.relay.udp import IdleExpiry

#: Unsent bytes a session's pool connection may hold before its datagrams
#: are dropped instead (Twisted pauses the producer past this).  Large
#: enough for one burst of reads from a busy UDP socket at 1 Gbit/s.
STREAM_BUFFER = 256 * 1024

log = Logger(namespace="tunnelpass.udp")


@implementer(IPushProducer, IHalfCloseableProtocol)
class DatagramStream(Protocol):
    """A pool connection carrying one session's datagrams (either side).

    It registers itself as the producer of its own transport only to learn
    when that transport is full (:attr:`paused`): datagrams are then
    dropped, not queued.  It unregisters before closing: a transport (TLS
    always, TCP while paused) does not close while a producer is registered.
    """

    paused = False
    received = False  # any bytes from the far side yet

    def __init__(self, session, greeting: bytes = b""):
        self.session = session
        self.greeting = greeting
        self.decoder = DatagramDecoder()

    def connectionMade(self) -> None:
        stream_of(self.transport).set_write_buffer(STREAM_BUFFER)  # bursts are dropped past this, not paused
        self.transport.registerProducer(self, True)
        if self.greeting:
            self.transport.write(self.greeting)
            self.greeting = b""
        self.session.stream_ready(self)

    def send(self, datagram: bytes) -> bool:
        if self.paused or not self.transport.connected:
            return False
        self.transport.write(frame(datagram))
        return True

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        self.received = True
        for datagram in self.decoder.feed(data):
            if session is None or session.closed:
                return  # (TLS goes on reading after a close)
            session.from_tunnel(datagram)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and transport.connected:
            transport.unregisterProducer()
            transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.session is not None:
            self.session.stream_ended(self)  # the far side ended the session

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        # Let go of the session: the server's tunnel connection keeps this
        # protocol in a reference cycle (gate <-> connection), and a session
        # held from garbage waits for the cyclic collector (see _Session.close).
        session, self.session = self.session, None
        if session is not None:
            session.stream_ended(self)

    # IPushProducer: the transport says when it is full.

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class _Session(IdleExpiry):
    """What both sides' sessions share: idle expiry, --udp-buffer/--rate
    admission, closing once, a place in the owner's session table."""

    closed = False
    answered = False  # a datagram went back towards the user (SessionTable)
    stream: DatagramStream | None = None

    def __init__(self, owner):
        self.owner = owner
        self.stats = owner.stats
        self.started = self.last_activity = owner.clock.seconds()
        self._schedule_expiry(owner.limits.udp_idle)

    def stream_ended(self, stream: DatagramStream) -> None:
        self.close()  # (a no-op once closed: our own close ends the stream too)

    def _admit(self, size: int) -> bool:
        """--udp-buffer and --rate for one datagram (UDP cannot be paused,
        only dropped); a drop is counted here."""
        limiter = self.owner.limits.limiter
        if size > self.owner.udp_buffer or (limiter is not None and not limiter.admit(size)):
            self.stats.udp_drops += 1
            return False
        return True

    def close(self) -> None:
        """End the session once.  It also lets go of its stream: a session
        and its stream refer to each other, and under churn (a session per
        DNS query) every cycle left for the garbage collector is promoted
        with the live pool connections and ends in a full collection -- a
        pause of a few hundred milliseconds in which no datagram moves.
        Freed by reference counting instead, a closed session costs nothing
        later."""
        if self.closed:
            return
        self.closed = True
        self._cancel_expiry()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
        self._closed()
        self.owner.session_closed(self)

    def _closed(self) -> None:
        """What a side releases besides the stream."""


def _limit_reached(owner, sessions, tcp_factory):
    """The limit that leaves no room for one more session, as ``(name,
    value)``: --max-sessions (UDP sessions) or --slot (UDP sessions and TCP
    connections together); None if there is room."""
    limits = owner.limits
    if len(sessions) >= limits.max_sessions:
        return "max-sessions", limits.max_sessions
    tcp = len(tcp_factory.relays) if tcp_factory is not None else 0
    if len(sessions) + tcp >= limits.max_conns:
        return "slot", limits.max_conns
    return None


def _make_room(owner, sessions: SessionTable, tcp_factory) -> bool:
    """Room for one more session, evicting quiet ones if a limit is
    reached (a UDP session makes room for a UDP session under --slot too;
    TCP connections are never evicted); False, logged, if every session is
    active, or if TCP connections alone fill --slot (evicting would not
    help)."""
    tcp = len(tcp_factory.relays) if tcp_factory is not None else 0
    if tcp < owner.limits.max_conns and sessions.make_room(
            lambda: _limit_reached(owner, sessions, tcp_factory) is not None):
        return True
    _note_refusal(owner, *_limit_reached(owner, sessions, tcp_factory), active=True)
    return False


def _note_refusal(owner, limit: str = "max-sessions", value: int = 0, active: bool = False) -> None:
    if owner._refusals.ready():
        log.warn("{listener}: {limit} {value} reached{why}, refused {count} UDP session(s)",
                 listener=owner.name, limit=limit, value=value, count=owner._refusals.take_count(),
                 why=f" and {ALL_ACTIVE}" if active else "")
