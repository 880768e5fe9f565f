# -*- test-case-name: tests.test_udptunnel -*-
"""UDP through the tunnel: one session per user address, one pool
connection per session.

*Ingress* is the side users send datagrams to (the server's ``--target`` in
the receive flow, the client's in the send flow).  Its listener keeps a
session per user address; a new session takes an idle pool connection just
as a TCP user does, starts it with OPEN_UDP (the user's addresses, for
PROXY v2) and then writes every datagram length-prefixed
(:mod:`tunnelpass.datagrams`).  Replies come back the same way and leave
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
:class:`~tunnelpass.sessiontable.SessionTable`; an eviction closes the pool
connection, which ends the other side's session too).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError
from twisted.internet.error import CannotListenError, InvalidAddressError, MessageLengthError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tunnelpass.codec import Type, encode_open
from tunnelpass.datagrams import DatagramDecoder, frame
from tunnelpass.dialsource import DialSourceError
from tunnelpass.fdbudget import udp_socket_failed
from tunnelpass.logs import Throttle
from tunnelpass.proxyproto import encode_v2
from tunnelpass.targetlog import TargetWarnings
from tunnelpass.relay import REFUSAL_LOG_INTERVAL, is_ip_literal
from tunnelpass.sessiontable import ALL_ACTIVE, SessionTable
from tunnelpass.targets import TargetGroup
from tunnelpass.udp import (MAX_DATAGRAM, SESSION_LOG_PREFIX, IdleExpiry, PendingDatagrams, SessionListener,
                            open_connected, resolve_udp)

#: Unsent bytes a session's pool connection may hold before its datagrams
#: are dropped instead (Twisted pauses the producer past this).  Large
#: enough for one burst of reads from a busy UDP socket at 1 Gbit/s.
STREAM_BUFFER = 256 * 1024
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

log = Logger(namespace="tunnelpass.udp")


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


def _raise_pause_threshold(transport) -> None:
    """Let the socket under *transport* (maybe under TLS) hold
    ``STREAM_BUFFER`` unsent bytes before it pauses its producer."""
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = STREAM_BUFFER
            return
        transport = getattr(transport, "transport", None)


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
        _raise_pause_threshold(self.transport)
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
            if session.closed:
                return  # (TLS goes on reading after a close)
            session.from_tunnel(datagram)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and transport.connected:
            transport.unregisterProducer()
            transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.session.stream_ended(self)  # the far side ended the session

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.session.stream_ended(self)

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
        if self.closed:
            return
        self.closed = True
        self._cancel_expiry()
        if self.stream is not None:
            self.stream.close()
        self._closed()
        self.owner.session_closed(self)

    def _closed(self) -> None:
        """What a side releases besides the stream."""


# Ingress


class IngressSession(_Session):
    """One user address on the public UDP listener."""

    def __init__(self, listener: "UDPIngress", client: tuple):
        super().__init__(listener)
        self.listener = listener
        self.client = self.key = client
        self.pending = PendingDatagrams(listener)
        self._waiting = None

    def start(self) -> None:
        pool = self.listener.pool_source()
        if pool is None:
            self.listener.note_problem("no pool connection: " + self.listener.unavailable)
            self.close()
            return
        d = self._waiting = pool.take()
        d.addCallbacks(self._got, self._failed)

    def _got(self, taken) -> None:
        self._waiting = None
        conn_id, connection = taken
        if self.closed:
            connection.transport.loseConnection()  # expired while waiting; the peer refills its pool
            return
        if not connection.transport.connected:
            self.start()  # it closed while idle: take the next one
            return
        greeting = encode_open(conn_id, self.client[:2], self.listener.local_address(), Type.OPEN_UDP)
        datagrams = self.pending.take()
        greeting += b"".join(frame(datagram) for datagram in datagrams)
        self.listener.claim(conn_id, connection, DatagramStream(self, greeting))
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

    *pool_source()* gives the idle pool to take from (or None), and
    *claim(conn_id, connection, stream)* hands a taken pool connection to
    *stream*.  *tcp_factory* is the TCP listener on the same address:
    ``--slot`` counts its connections and these sessions together.
    """

    noisy = False

    def __init__(self, name: str, clock, limits, stats, udp_buffer: int, pool_source, claim,
                 unavailable: str = "not connected", tcp_factory=None):
        self.name, self.clock, self.limits, self.stats = name, clock, limits, stats
        self.udp_buffer = udp_buffer
        self.pool_source, self.claim, self.unavailable = pool_source, claim, unavailable
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


# Egress


class _TargetSocket(DatagramProtocol):
    """The connected UDP socket of one egress session."""

    noisy = False

    def __init__(self, session: "EgressSession"):
        self.session = session

    def logPrefix(self) -> str:
        # Twisted logs every UDP socket it opens; under this prefix the
        # log filter (tunnelpass.logs) demotes that line to debug, as for
        # the forwarder's sessions -- else one line per session.
        return SESSION_LOG_PREFIX

    def datagramReceived(self, datagram: bytes, addr) -> None:
        self.session.from_target(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable: that datagram is lost; the target may come back.
        self.session.stats.udp_drops += 1
        self.session.target_refused()


class EgressSession(_Session):
    """One OPEN_UDP stream and its socket to the target."""

    _refused = False  # the last write met ICMP port unreachable

    def __init__(self, egress: "UDPEgress", addresses):
        super().__init__(egress)
        self.egress = egress
        self.key = self  # no address: the session is its own key
        self.socket = None
        self.pending: PendingDatagrams | None = PendingDatagrams(egress)
        self.header = b""
        if egress.limits.proxy == "v2" and addresses is not None:
            # PROXY v2 in front of every datagram, as the spec asks for UDP.
            self.header = encode_v2(addresses[0], addresses[1], "udp")
        self.index = egress.group.order()[0]

    def stream_ready(self, stream: DatagramStream) -> None:
        self.stream = stream
        host, port = self.egress.group.targets[self.index]
        dialer = self.egress.limits.dialer  # --dial / --dns
        if dialer is not None:
            dialer.resolve_udp(host, port).addCallbacks(self._open, self._resolve_failed)
        elif self.egress.literal[self.index]:
            self._open((host, port))
        else:
            resolve_udp(self.egress.reactor, host, port).addCallbacks(self._open, self._resolve_failed)

    def _open(self, address: tuple) -> None:
        if self.closed:
            return
        try:
            self.socket = open_connected(self.egress.reactor, _TargetSocket(self), address,
                                         self.egress.limits.dialer)
        except Exception as e:
            udp_socket_failed(self.egress, e)
            self.egress.note_problem(f"cannot open a socket to the target: {e}")
            self.close()
            return
        for datagram in self.pending.take():
            self._send(datagram)
        self.pending = None

    def _resolve_failed(self, reason) -> None:
        self.egress.group.failed(self.index)
        what = "cannot dial" if reason.check(DialSourceError) else "cannot resolve"
        self.egress.note_problem(f"{what} the target: {reason.getErrorMessage()}")
        self.close()

    def from_tunnel(self, datagram: bytes) -> None:
        self.egress.sessions.touch(self, self.egress.clock.seconds())
        if not self._admit(len(datagram)):
            return
        if self.pending is not None:
            if not self.pending.hold(datagram):
                self.stats.udp_drops += 1
            return
        self._send(datagram)

    def _send(self, datagram: bytes) -> None:
        if self.socket is None:  # closed
            self.stats.udp_drops += 1
            return
        self._refused = False
        try:
            self.socket.write(self.header + datagram if self.header else datagram)
        except (OSError, MessageLengthError):  # EAGAIN, ENOBUFS, EMSGSIZE
            self.stats.udp_drops += 1
            return
        if not self._refused:  # (an ECONNREFUSED write is reported, not raised)
            self.stats.udp_datagrams_in += 1
            self.stats.bytes_in += len(datagram)

    def from_target(self, datagram: bytes) -> None:
        if self.closed:
            return
        self.egress.sessions.replied(self, self.egress.clock.seconds())
        if not self._admit(len(datagram)):
            return
        if self.stream.send(datagram):
            self.stats.udp_datagrams_out += 1
            self.stats.bytes_out += len(datagram)
        else:
            self.stats.udp_drops += 1

    def target_refused(self) -> None:
        self._refused = True
        self.egress.group.failed(self.index)  # later sessions try the others first
        host, port = self.egress.group.targets[self.index]
        self.egress.target_warnings.failed(self.egress.name, host, port, "port unreachable (ICMP)", "udp")

    def _closed(self) -> None:
        if self.pending is not None:
            self.stats.udp_drops += len(self.pending.take())
            self.pending = None
        if self.socket is not None:
            socket, self.socket = self.socket, None
            socket.stopListening()


class UDPEgress:
    """The side that dials ``--target``: a socket per OPEN_UDP stream.

    *tcp_factory* is the TCP relay factory dialling the same targets;
    ``--slot`` counts its connections and these sessions together.
    """

    def __init__(self, reactor, name: str, targets: list, limits, stats, udp_buffer: int,
                 clock=None, tcp_factory=None, enabled: bool = True):
        self.reactor, self.clock = reactor, clock or reactor
        self.name, self.limits, self.stats, self.udp_buffer = name, limits, stats, udp_buffer
        self.enabled = enabled
        self.group = TargetGroup(targets, self.clock, strategy=limits.lbs, fallback=limits.fallback)
        self.literal = [is_ip_literal(host) for host, _ in targets]
        self.tcp_factory = tcp_factory
        self.sessions = SessionTable(name, self.clock, stats)
        self.pending_bytes = 0
        self._problems = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self._refusals = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self.target_warnings = TargetWarnings(self.clock)  # ICMP port unreachable, throttled per target
        if tcp_factory is not None:
            tcp_factory.udp_sessions = self.sessions

    def open(self, addresses) -> DatagramStream | None:
        """The protocol for a pool connection that just started with
        OPEN_UDP, or None to refuse it (the caller closes the connection)."""
        if not self.enabled:
            self.note_problem("UDP is disabled here (--no-udp)")
            return None
        # The other side evicts as this side does; its eviction's close
        # may reach us after the new session's OPEN_UDP (another
        # connection), so this side makes room the same way.
        if not _make_room(self, self.sessions, self.tcp_factory):
            self.stats.udp_refused += 1
            return None
        session = EgressSession(self, addresses)
        self.sessions.add(session)
        self.stats.udp_sessions += 1
        self.stats.udp_sessions_total += 1
        return DatagramStream(session)

    def session_closed(self, session: EgressSession) -> None:
        if self.sessions.remove(session):
            self.stats.udp_sessions -= 1

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.close()

    def note_problem(self, why: str) -> None:
        if self._problems.ready():
            log.warn("{listener}: UDP session refused: {why} ({count} so far)",
                     listener=self.name, why=why, count=self._problems.take_count())
