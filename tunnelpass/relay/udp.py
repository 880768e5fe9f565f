# -*- test-case-name: tests.test_udp -*-
"""UDP relay: one upstream socket per client address ("session").

Each session owns a connected UDP socket towards the remote, so replies are
told apart by the kernel and reach the right client, and only the configured
remote can answer.  Sessions expire after ``udp_idle`` without traffic in
either direction; their number per listener is capped, and a full table
evicts a quiet session for a new one (:mod:`tunnelpass.relay.sessiontable`) before
it refuses any; datagrams are carried
whole (sockets read up to 65535 bytes) and any send error is a counted drop,
never a crash.
"""

from __future__ import annotations

import socket

from twisted.internet.defer import Deferred
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from tunnelpass.relay.dialsource import DialSourceError
from tunnelpass.wire.proxyproto import encode_v2
from tunnelpass.ops.fdbudget import udp_socket_failed
from tunnelpass.ops.logs import Throttle
from tunnelpass.relay.targetlog import TargetWarnings
from tunnelpass.relay.relay import REFUSAL_LOG_INTERVAL
from tunnelpass.config.limits import Limits
from tunnelpass.relay.sessiontable import ALL_ACTIVE, SessionTable
from tunnelpass.config.settings import is_ip_literal
from tunnelpass.ops.stats import ListenerStats

#: Largest datagram read from any socket (IPv4 payloads top out at 65507).
MAX_DATAGRAM = 65535
#: Datagrams (and bytes) held per session while its remote name resolves.
MAX_PENDING_DATAGRAMS = 64
MAX_PENDING_BYTES = 256 * 1024
MAX_LISTENER_PENDING_BYTES = 4 << 20
#: Socket buffers asked of the kernel so bursts of large datagrams fit.
SOCKET_BUFFER = 4 << 20

SESSION_LOG_PREFIX = "tunnelpass-udp-session"


def _enlarge_buffers(port) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            port.socket.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def resolve_udp(reactor, host: str, port: int) -> Deferred:
    """Resolve *host* to one ``(ip, port)`` in a thread (IPv4 or IPv6)."""

    def lookup():
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"no address for {host}")
        return infos[0][4][:2]

    return deferToThreadPool(reactor, reactor.getThreadPool(), lookup)


def open_connected(reactor, protocol, address: tuple, dialer=None):
    """A UDP socket for *protocol*, connected to *address* (an IP literal):
    replies are told apart by the kernel and only that address can answer.
    Bound to *dialer*'s ``--dial`` source address if it has one.  Raises
    (EMFILE, an address that cannot be a UDP peer, ...) after releasing
    whatever it opened."""
    interface = dialer.udp_interface(address[0]) if dialer else ("::" if ":" in address[0] else "0.0.0.0")
    port = None
    try:
        port = reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)
        _enlarge_buffers(port)
        port.connect(address[0], address[1])
    except Exception:
        if port is not None:
            port.stopListening()
        raise
    return port


class PendingDatagrams:
    """Datagrams held while a session is not ready (its remote's name
    resolves, its tunnel connection comes): bounded per session and per
    *owner* (``owner.pending_bytes``); what does not fit is for the caller
    to count as a drop."""

    def __init__(self, owner):
        self.owner = owner
        self.datagrams: list[bytes] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self.datagrams)

    def hold(self, datagram: bytes) -> bool:
        size = len(datagram)
        if (len(self.datagrams) < MAX_PENDING_DATAGRAMS and self.size + size <= MAX_PENDING_BYTES
                and self.owner.pending_bytes + size <= MAX_LISTENER_PENDING_BYTES):
            self.datagrams.append(datagram)
            self.size += size
            self.owner.pending_bytes += size
            return True
        return False

    def take(self) -> list[bytes]:
        datagrams = self.datagrams
        self.owner.pending_bytes -= self.size
        self.datagrams, self.size = [], 0
        return datagrams


class IdleExpiry:
    """Mixin: a session that ends (``close()``) after its owner's
    ``limits.udp_idle`` without traffic.  Traffic only stamps
    ``last_activity``; one timer per session is re-armed lazily, so the hot
    path never touches the timer heap."""

    owner = None  # has .clock and .limits
    last_activity = 0.0
    _expiry = None

    def _schedule_expiry(self, delay: float) -> None:
        self._expiry = self.owner.clock.callLater(max(delay, 0.001), self._check_idle)

    def _check_idle(self) -> None:
        self._expiry = None  # (fired: it holds this session through its callable)
        remaining = self.last_activity + self.owner.limits.udp_idle - self.owner.clock.seconds()
        if remaining > 0:
            self._schedule_expiry(remaining)
        else:
            self.close()

    def _cancel_expiry(self) -> None:
        expiry, self._expiry = self._expiry, None
        if expiry is not None and expiry.active():
            expiry.cancel()


class UDPSession(DatagramProtocol, IdleExpiry):
    """The upstream socket of one client: datagrams from the remote go back
    to that client through the listening socket."""

    transport = None
    noisy = False
    answered = False  # the remote has replied (see SessionTable)

    def __init__(self, listener: "UDPForwardProtocol", client: tuple):
        self.listener = listener
        self.client = self.key = client
        self.stats = listener.stats
        self.pending: PendingDatagrams | None = PendingDatagrams(listener)
        self.last_activity = listener.clock.seconds()
        self.closed = False
        # PROXY v2 goes in front of every datagram (the spec's rule for UDP).
        self.header = b""
        if listener.limits.proxy == "v2" and listener.transport is not None:
            local = listener.transport.getHost()
            self.header = encode_v2(client[:2], (local.host, local.port), "udp")

    @property
    def owner(self):
        return self.listener  # for IdleExpiry

    def logPrefix(self) -> str:
        return SESSION_LOG_PREFIX

    def start(self) -> None:
        listener = self.listener
        self._schedule_expiry(listener.limits.udp_idle)
        if is_ip_literal(listener.remote_host) and listener.limits.dialer is None:
            self._open((listener.remote_host, listener.remote_port))
        else:
            listener.resolve().addCallbacks(self._open, self._resolve_failed)

    def _open(self, address: tuple) -> None:
        if self.closed:
            return
        try:
            open_connected(self.listener.reactor, self, address, self.listener.limits.dialer)
        except Exception as e:
            self.transport = None
            udp_socket_failed(self.listener, e)
            self._give_up("cannot open a socket to {remote}: {reason}", str(e))
            return
        pending, self.pending = self.pending.take(), None
        for datagram in pending:
            self.send(datagram)

    def _resolve_failed(self, reason) -> None:
        what = "cannot dial {remote}" if reason.check(DialSourceError) else "cannot resolve {remote}"
        self._give_up(what + ": {reason}", reason.getErrorMessage())

    def _give_up(self, message: str, reason: str) -> None:
        """Drop this session (and what it holds); the next datagram from the
        client tries again."""
        listener = self.listener
        if listener.problems.ready():
            listener.log.warn(
                "{listener}: " + message + " ({count} time(s))",
                listener=listener.name, remote=listener.remote_host, reason=reason,
                count=listener.problems.take_count(),
            )
        self.close()

    def send(self, datagram: bytes) -> None:
        """Client -> remote."""
        if self.closed:  # its socket could not be opened
            self.stats.udp_drops += 1
            return
        self.listener.sessions.touch(self, self.listener.clock.seconds())
        if self.pending is not None:
            if not self.pending.hold(datagram):
                self.stats.udp_drops += 1
            return
        try:
            self.transport.write(self.header + datagram if self.header else datagram)
        except (OSError, MessageLengthError):  # EAGAIN, ENOBUFS, EMSGSIZE
            self.stats.udp_drops += 1
        else:
            self.stats.udp_datagrams_in += 1
            self.stats.bytes_in += len(datagram)

    def datagramReceived(self, datagram: bytes, addr) -> None:
        """Remote -> client."""
        self.listener.sessions.replied(self, self.listener.clock.seconds())
        self.listener.deliver(datagram, self.client)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the remote: the datagram is lost, the
        # session stays (the remote may come back).
        self.stats.udp_drops += 1
        listener = self.listener
        listener.target_warnings.failed(listener.name, listener.remote_host, listener.remote_port,
                                        "port unreachable (ICMP)", "udp")

    def stopProtocol(self) -> None:
        """The session's socket is closed.  Besides our own close, Twisted
        closes a connected UDP socket whose only pending event is an error
        (ICMP port unreachable with nothing to read), without telling
        ``connectionRefused``: then the session ends here (counted as a
        refusal), and the client's next datagram opens a new one, instead
        of every datagram meeting a socket that is gone."""
        if self.closed:
            return
        self.connectionRefused()
        self.transport = None  # gone: close() has nothing to stop
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:
            self.stats.udp_drops += len(self.pending.take())  # never sent: lost
        self._cancel_expiry()
        if self.transport is not None:
            self.transport.stopListening()
        self.listener.session_closed(self)


class SessionListener(DatagramProtocol):
    """A listening UDP socket and its sessions, one per client address
    (``session.client``), in a :class:`SessionTable`; replies leave through
    this socket."""

    noisy = False
    sessions: SessionTable
    stats: ListenerStats

    def reply(self, datagram: bytes, client: tuple) -> bool:
        if self.transport is None:
            return False
        try:
            self.transport.write(datagram, client)
        except (OSError, MessageLengthError):  # EAGAIN, ENOBUFS, ...
            return False
        return True

    def deliver(self, datagram: bytes, client: tuple) -> None:
        """A reply to *client*, counted as sent or dropped."""
        if self.reply(datagram, client):
            self.stats.udp_datagrams_out += 1
            self.stats.bytes_out += len(datagram)
        else:
            self.stats.udp_drops += 1

    def session_closed(self, session) -> None:
        if self.sessions.remove(session):
            self.stats.udp_sessions -= 1

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close()

    def startProtocol(self) -> None:
        _enlarge_buffers(self.transport)

    def stopProtocol(self) -> None:
        self.close_all()


class UDPForwardProtocol(SessionListener):
    """The forwarder's listening socket of one UDP endpoint."""

    log = Logger(namespace="tunnelpass.forward")

    def __init__(self, reactor, name: str, remote_host: str, remote_port: int,
                 limits: Limits, stats: ListenerStats | None = None, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.name = name
        self.stats = stats or ListenerStats()
        self.sessions = SessionTable(name, self.clock, self.stats)
        self.pending_bytes = 0  # held by all sessions waiting for a lookup
        self.problems = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self._refusals = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self.target_warnings = TargetWarnings(self.clock)  # ICMP port unreachable, throttled per target
        self._lookup: list[Deferred] | None = None
        self.update(remote_host, remote_port, limits)

    def update(self, remote_host: str, remote_port: int, limits: Limits) -> None:
        """New sessions use the new remote/limits; live sessions keep theirs."""
        self.remote_host, self.remote_port, self.limits = remote_host, remote_port, limits
        self._lookup = None  # a lookup of the old name must not serve the new one

    def resolve(self) -> Deferred:
        """The remote's address, looked up anew -- but sessions created while
        a lookup is running share it instead of each starting their own.
        With an instance dialer (``--dns``) its name cache does all that."""
        if self.limits.dialer is not None:
            return self.limits.dialer.resolve_udp(self.remote_host, self.remote_port)
        waiter = Deferred()
        if self._lookup is None:
            self._lookup = waiters = [waiter]
            host, port = self.remote_host, self.remote_port

            def done(result):
                if self._lookup is waiters:
                    self._lookup = None
                for d in waiters:
                    d.callback(result)

            resolve_udp(self.reactor, host, port).addBoth(done)
        else:
            self._lookup.append(waiter)
        return waiter

    def datagramReceived(self, datagram: bytes, addr) -> None:
        session = self.sessions.get(addr)
        if session is None:
            if not self.sessions.make_room(self._full):
                self.stats.udp_drops += 1
                self.stats.udp_refused += 1
                self._note_refusal()
                return
            session = UDPSession(self, addr)
            self.sessions.add(session)
            self.stats.udp_sessions += 1
            self.stats.udp_sessions_total += 1
            session.start()
        session.send(datagram)

    def _full(self) -> bool:
        return len(self.sessions) >= self.limits.max_sessions

    def _note_refusal(self) -> None:
        if self._refusals.ready():
            self.log.warn(
                "{listener}: max-sessions {max_sessions} reached and {why}: "
                "dropped datagrams from {count} new client(s)",
                listener=self.name, max_sessions=self.limits.max_sessions, why=ALL_ACTIVE,
                count=self._refusals.take_count(),
            )
