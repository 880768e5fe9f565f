# -*- test-case-name: tests.test_udptunnel -*-
"""UDP through the tunnel: one session per user address, one pool
connection per session.

*Ingress* is the side users send datagrams to (the server's ``--target`` in
the receive flow, the client's in the send flow).  Its listener keeps a
session per user address; a new session opens a stream just as a TCP user
does (the stream opener announces it with OPEN_UDP and the user's
addresses, for PROXY v2) and then writes every datagram length-prefixed
(:mod:`tunnelpass.wire.datagrams`).  Replies come back the same way and leave
the listening socket towards that user.

*Egress* is the side that dials ``--target``: each OPEN_UDP stream gets its
own connected UDP socket to a target, so the kernel tells replies apart and
only the target can answer.

Nothing queues without bound.  Datagrams wait only while a session's pool
connection is on its way (64 datagrams / 256 KiB per session, 4 MiB per
listener).  A stream whose connection cannot take more (its transport
paused us: more than ``STREAM_BUFFER`` bytes unsent) drops datagrams rather
than buffering them.  Datagrams over ``--udp-buffer`` bytes, over the
``--rate`` budget, beyond ``--max-sessions``/``--slot`` or refused by the
kernel are dropped too.  Every drop is counted; none ends a session.
Sessions end after ``--udp-idle`` without a datagram either way, when
their pool connection closes (the next datagram starts a new one), or when
a full table evicts them for a new session (both sides' tables are
:class:`~tunnelpass.relay.sessiontable.SessionTable`; an eviction closes the pool
connection, which ends the other side's session too).

This module is the ingress side; the egress side is
:mod:`tunnelpass.tunnel.udpegress`, what both share (the stream, the session base,
the session limits) :mod:`tunnelpass.tunnel.udpstream`.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import CannotListenError, InvalidAddressError

from tunnelpass.wire.datagrams import frame
from tunnelpass.ops.logs import Throttle
from tunnelpass.relay.relay import REFUSAL_LOG_INTERVAL
from tunnelpass.relay.sessiontable import SessionTable
from tunnelpass.config.settings import is_ip_literal
from tunnelpass.carriers.stream import UDP
from tunnelpass.relay.udp import MAX_DATAGRAM, PendingDatagrams, SessionListener
from tunnelpass.tunnel.udpstream import DatagramStream, _make_room, _note_refusal, _Session, log

#: Sessions that may wait for a pool connection at once: the pool's queue is
#: shared with TCP users, and UDP sources are easy to spoof.  Each waiting
#: session asks for one more pool connection, so a new session never
#: evicts its way past this cap (it is refused).
MAX_WAITING_SESSIONS = 128
#: A user address whose session the far side refused twice in a row (it
#: closed the connection without answering, within REFUSED_WITHIN seconds
#: of getting it) gets no new session for this long: each one would cost a
#: pool connection.  One such close alone may be a pool connection that
#: died while idle, so the first only makes the address a suspect.
REFUSAL_COOL_DOWN = 5.0
REFUSED_WITHIN = 1.0


def listen_udp(reactor, host: str, port: int, protocol, beside=None):
    """Bind the UDP side of a listening address.  Twisted binds UDP to IP
    literals only: a name takes the address the TCP listener *beside* got,
    else one lookup now (at startup, like the TCP bind).  Every failure is a
    :class:`CannotListenError`."""
    interface = host
    if not is_ip_literal(host):
        if beside is not None:
            interface = beside.getHost().host
        else:
            import socket

            try:
                interface = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][4][0]
            except OSError as e:
                raise CannotListenError(host, port, e) from None
    try:
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)
    except InvalidAddressError as e:
        raise CannotListenError(host, port, e) from None


class IngressSession(_Session):
    """One user address on the public UDP listener."""

    def __init__(self, listener: "UDPIngress", client: tuple):
        super().__init__(listener)
        self.listener = listener
        self.client = self.key = client
        self.pending = PendingDatagrams(listener)
        self._waiting = None

    def start(self) -> None:
        d = self.listener.opener.open(UDP, (self.client[:2], self.listener.local_address()))
        if not d.called:
            self._waiting = d
        d.addCallbacks(self._got, self._failed)

    def _got(self, stream) -> None:
        self._waiting = None
        if self.closed:
            stream.loseConnection()  # ended while its stream was on the way
            return
        datagrams = self.pending.take()
        stream.attach(DatagramStream(self, b"".join(frame(datagram) for datagram in datagrams)))
        self.stats.udp_datagrams_in += len(datagrams)
        self.stats.bytes_in += sum(map(len, datagrams))

    def _failed(self, failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            return  # the session ended while waiting
        self.listener.note_problem(failure.getErrorMessage())
        self.close()

    def stream_ready(self, stream: DatagramStream) -> None:
        self.stream = stream
        self.attached = self.listener.clock.seconds()
        self.listener.unattached.discard(self)

    def stream_ended(self, stream: DatagramStream) -> None:
        if self.closed:
            return  # we closed it (expiry, shutdown): not a refusal
        if not stream.received and self.listener.clock.seconds() - self.attached < REFUSED_WITHIN:
            self.listener.refused(self.client)
        self.close()

    def from_user(self, datagram: bytes) -> None:
        """A datagram the listener admitted (size, --rate)."""
        if self.closed:
            self.stats.udp_drops += 1
            return
        self.listener.sessions.touch(self, self.listener.clock.seconds())
        stream = self.stream
        if stream is None:
            if not self.pending.hold(datagram):
                self.stats.udp_drops += 1
        elif stream.send(datagram):
            self.stats.udp_datagrams_in += 1
            self.stats.bytes_in += len(datagram)
        else:
            self.stats.udp_drops += 1

    def from_tunnel(self, datagram: bytes) -> None:
        self.listener.sessions.replied(self, self.listener.clock.seconds())
        if self._admit(len(datagram)):
            self.listener.deliver(datagram, self.client)

    def _closed(self) -> None:
        self.stats.udp_drops += len(self.pending.take())  # never sent: lost
        self.listener.unattached.discard(self)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()


class UDPIngress(SessionListener):
    """The public UDP listener and its session table.

    Each new session gets its stream from *opener* (an
    :class:`~tunnelpass.carriers.stream.IStreamOpener`, the pool's
    :class:`~tunnelpass.carriers.opener.PoolOpener`).  *tcp_factory* is the TCP
    listener on the same address: ``--slot`` counts its connections and
    these sessions together.
    """

    noisy = False

    def __init__(self, name: str, clock, limits, stats, udp_buffer: int, opener, tcp_factory=None):
        self.name, self.clock, self.limits, self.stats = name, clock, limits, stats
        self.udp_buffer = udp_buffer
        self.opener = opener
        self.tcp_factory = tcp_factory
        self.sessions = SessionTable(name, clock, stats)
        self.cooling: dict[tuple, float] = {}  # user address -> no new session before this time
        self.suspects: dict[tuple, float] = {}  # refused once: a second refusal before this time cools
        self.unattached: set[IngressSession] = set()  # sessions waiting for a pool connection
        self.pending_bytes = 0
        self._problems = Throttle(clock, REFUSAL_LOG_INTERVAL)
        self._refusals = Throttle(clock, REFUSAL_LOG_INTERVAL)
        if tcp_factory is not None:
            tcp_factory.udp_sessions = self.sessions

    def local_address(self) -> tuple:
        host = self.transport.getHost()
        return host.host, host.port

    def datagramReceived(self, datagram: bytes, addr) -> None:
        size = len(datagram)
        limiter = self.limits.limiter
        if size > self.udp_buffer or (limiter is not None and not limiter.admit(size)):
            self.stats.udp_drops += 1
            return
        session = self.sessions.get(addr)
        if session is None:
            if self._cooling(addr) or not self._room():
                self.stats.udp_drops += 1
                self.stats.udp_refused += 1
                return
            session = IngressSession(self, addr)
            self.sessions.add(session)
            self.unattached.add(session)
            self.stats.udp_sessions += 1
            self.stats.udp_sessions_total += 1
            session.start()
            if session.closed:
                self.stats.udp_drops += 1
                return
        session.from_user(datagram)

    def _room(self) -> bool:
        """Room for one more session: never past MAX_WAITING_SESSIONS
        waiting for the pool; past --max-sessions/--slot only by evicting."""
        if len(self.unattached) >= MAX_WAITING_SESSIONS:
            _note_refusal(self, "sessions waiting for the pool:", MAX_WAITING_SESSIONS)
            return False
        return _make_room(self, self.sessions, self.tcp_factory)

    def refused(self, user: tuple) -> None:
        """The far side refused *user*'s session: the second time in a row,
        no new one for a while.  Both tables are bounded (by --max-sessions);
        when full of live entries they let users through."""
        now = self.clock.seconds()
        if self.suspects.pop(user, 0.0) > now:
            self.cooling = _remember(self.cooling, user, now + REFUSAL_COOL_DOWN, now, self.limits.max_sessions)
            self.note_problem("the other side of the tunnel refused it twice (its --no-udp, --slot or "
                              "--max-sessions?)")
        else:
            self.suspects = _remember(self.suspects, user, now + REFUSAL_COOL_DOWN, now, self.limits.max_sessions)

    def _cooling(self, addr) -> bool:
        until = self.cooling.get(addr)
        if until is None:
            return False
        if until > self.clock.seconds():
            return True
        del self.cooling[addr]
        return False

    def note_problem(self, why: str) -> None:
        if self._problems.ready():
            log.warn("{listener}: UDP session refused: {why} ({count} so far)",
                     listener=self.name, why=why, count=self._problems.take_count())


def _remember(table: dict, key, until: float, now: float, limit: int) -> dict:
    """``table[key] = until``, dropping expired entries when it is full, and
    leaving *key* out if it is still full."""
    if len(table) >= limit:
        table = {k: t for k, t in table.items() if t > now}
    if len(table) < limit:
        table[key] = until
    return table
