# -*- test-case-name: tests.test_udptunnel -*-
"""UDP through the tunnel, egress: the side that dials ``--target``.

Each pool connection that starts with OPEN_UDP becomes one session with its
own connected UDP socket to a target of the group (resolved through the
instance's dialer: ``--dial``, ``--dns``), so the kernel tells replies apart
and only the target can answer.  Under ``--proxy-protocol v2`` every
datagram carries the user's addresses.  An ICMP port unreachable counts a
drop and steers later sessions to the group's other targets.

The ingress side and the overview are :mod:`tunnelpass.tunnel.udptunnel`; what both
share is :mod:`tunnelpass.tunnel.udpstream`.
"""

from __future__ import annotations

from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol

from tunnelpass.relay.dialsource import DialSourceError
from tunnelpass.ops.fdbudget import udp_socket_failed
from tunnelpass.ops.logs import Throttle
from tunnelpass.wire.proxyproto import encode_v2
from tunnelpass.relay.namecache import literal
from tunnelpass.relay.relay import REFUSAL_LOG_INTERVAL
from tunnelpass.relay.sessiontable import SessionTable
from tunnelpass.relay.targetlog import TargetWarnings
from tunnelpass.relay.targets import TargetGroup
from tunnelpass.relay.udp import SESSION_LOG_PREFIX, PendingDatagrams, open_connected, resolve_udp
from tunnelpass.tunnel.udpstream import DatagramStream, _make_room, _Session, log


class _TargetSocket(DatagramProtocol):
    """The connected UDP socket of one egress session."""

    noisy = False

    def __init__(self, session: "EgressSession"):
        self.session = session

    def logPrefix(self) -> str:
        # Twisted logs every UDP socket it opens; under this prefix the
        # log filter (tunnelpass.ops.logs) demotes that line to debug, as for
        # the forwarder's sessions -- else one line per session.
        return SESSION_LOG_PREFIX

    def datagramReceived(self, datagram: bytes, addr) -> None:
        self.session.from_target(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable: that datagram is lost; the target may come back.
        self.session.stats.udp_drops += 1
        self.session.target_refused()

    def stopProtocol(self) -> None:
        """The socket is closed: by the session, or by Twisted, which closes
        a connected UDP socket whose only pending event is an error (ICMP
        port unreachable with nothing to read) without telling
        ``connectionRefused``.  Then the session ends (counted as a refusal;
        its stream ends, so the far side's next datagram opens a new one)
        instead of every datagram meeting a socket that is gone."""
        self.session.socket_gone()


class EgressSession(_Session):
    """One OPEN_UDP stream and its socket to the target."""

    _refused = False  # the last write met ICMP port unreachable

    @property
    def key(self) -> "EgressSession":
        """No address: the session is its own key in the table (a property,
        not an attribute: ``self.key = self`` would be a reference cycle,
        leaving every closed session to the garbage collector)."""
        return self

    def __init__(self, egress: "UDPEgress", addresses):
        super().__init__(egress)
        self.egress = egress
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
        ip = self.egress.literal[self.index]
        dialer = self.egress.limits.dialer  # --dial / --dns
        if ip is not None:
            # An IP literal needs no lookup, so no Deferred chain per session
            # (a DNS query through the tunnel is a session); its family was
            # checked against --dial at startup.
            self._open((ip, port))
        elif dialer is not None:
            dialer.resolve_udp(host, port).addCallbacks(self._open, self._resolve_failed)
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

    def socket_gone(self) -> None:
        if self.closed or self.socket is None:
            return  # our own close
        self.socket = None
        self.stats.udp_drops += 1
        self.target_refused()
        self.close()

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
        self.literal = [literal(host) for host, _ in targets]  # normalized IP, or None for a name
        self.tcp_factory = tcp_factory
        self.sessions = SessionTable(name, self.clock, stats)
        self.pending_bytes = 0
        self._problems = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self._refusals = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self.target_warnings = TargetWarnings(self.clock)  # ICMP port unreachable, throttled per target
        if tcp_factory is not None:
            tcp_factory.udp_sessions = self.sessions

    def open(self, addresses) -> DatagramStream | None:
        """The protocol for a stream the far side opened with OPEN_UDP
        (:class:`~tunnelpass.tunnel.dispatch.OpenDispatcher` attaches it), or None
        to refuse it (the dispatcher aborts the stream)."""
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
