# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""``--mode server``: the public end of a tunnel.

One TCP port (``--tunnel``) takes every connection a client makes.  Its
first byte says what it is: ``0x16`` starts TLS (when the server has a TLS
level), anything else must be a tunnel frame -- HELLO opens a control
channel, POOL_AUTH files an idle data connection.  Until then the
connection is unauthenticated: it counts against the handshake guard (caps
per source and overall, with fair eviction when the overall cap is reached;
a ban on control connections after repeated wrong keys) and one deadline
covers TLS and the tunnel handshake together.

Flows: *receive* (reverse tunnel) listens on ``--target`` for users and
hands each one an idle pool connection; *send* (forward tunnel) dials
``--target`` for each pool connection the client starts.  One client
session at a time: a newly authenticated one replaces the old at once.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import signal
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from OpenSSL import SSL
from zope.interface import implementer

from tunnelpass import tls as tlsmod
from tunnelpass.codec import OPENS, FrameDecoder, ProtocolError, Type, decode_open, encode, encode_open, encode_text
from tunnelpass.control import ServerControlProtocol
from tunnelpass.guard import Ban, HandshakeGuard, Refused
from tunnelpass.keepalive import enable_keepalive
from tunnelpass.metrics import Sample, rate_samples, tunnel_samples
from tunnelpass.handshake import (
    AUTH_FAILED,
    FLOWS,
    ID,
    TLS_REQUIRED,
    HandshakeError,
    PoolAuthenticator,
    SessionConfig,
)
from tunnelpass.pool import IdlePool
from tunnelpass.probe import start_probe
from tunnelpass.relay import OutboundProtocol, TCPForwardFactory, user_addresses
from tunnelpass.replacement import SessionReplacements
from tunnelpass.gatelog import PlainClients, tls_error_text, tls_failed
from tunnelpass.rules import Limits
from tunnelpass.stats import ListenerStats, tunnel_fields
from tunnelpass.fdbudget import Descriptors
from tunnelpass.fdport import listen_tcp
from tunnelpass.forward import cannot_listen, file_stamp, raise_fd_limit
from tunnelpass.settings import format_address
from tunnelpass.signals import Signals
from tunnelpass.pooldial import PoolDialFactory
from tunnelpass.switch import SwitchingProtocol
from tunnelpass.tlshalf import HalfCloseTLSFactory, HalfCloseTLSProtocol
from tunnelpass.udp import MAX_DATAGRAM
from tunnelpass.udptunnel import UDPEgress, UDPIngress, listen_udp

TLS_RECORD = 0x16
#: Why tunnel handshakes fail, for ``handshake_failures{reason}``: a fixed
#: set, so a hostile peer cannot grow the metric's label space.
FAILURE_REASONS = ("timeout", "protocol", "auth", "pool_auth", "tls", "no_tls", "closed")
#: ERROR code for a control connection the guard turns away (its address
#: has had too many wrong keys): the client logs the reason and backs off.
TRY_LATER = 8
POOL_OK = encode(Type.POOL_OK)
POOL_AUTH_SIZE = 2 * ID + 8 + 32
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class ServerSettings:
    tunnel_host: str
    tunnel_port: int
    target_host: str
    target_port: int
    key: str
    key_generated: bool = False
    flow: str = "auto"  # auto | receive | send
    tls: int = 0
    cert: str | None = None
    private_key: str | None = None
    state_dir: str | None = None
    max_pool: int = 1024
    pool_timeout: float = 5.0
    handshake_timeout: float = 5.0
    heartbeat: float = 5.0
    report_interval: float = 60.0  # health lines (--report-interval); the heartbeat is separate
    reload_interval: float = 3600.0
    shutdown_timeout: float = 5.0
    limits: Limits = Limits()
    zero_copy: bool = True
    max_handshakes: int = 1024
    max_handshakes_per_source: int = 256
    public_address: tuple | None = None  # --public-address (host, port or None): what the token carries
    accept_proxy: tuple = ()  # trusted load balancers in front of the public listener
    targets: tuple = ()  # a target group for the send flow (default: the one target)
    tcp: bool = True  # --no-tcp: do not carry TCP
    udp: bool = True  # --no-udp: do not carry UDP
    udp_buffer: int = MAX_DATAGRAM  # largest datagram carried (bytes)


class ServerSession:
    """One authenticated client: its control channel and idle pool."""

    def __init__(self, server: "TunnelServer", control: ServerControlProtocol):
        self.server = server
        self.control = control
        self.session = control.session
        self.authenticator = PoolAuthenticator(self.session, b"")  # per-connection fingerprint in verify()
        self.pool = IdlePool(server.clock, server.pool_bound, self._want_more,
                             timeout=server.settings.pool_timeout)
        control.on_retire = self.retire

    def _want_more(self, count: int) -> None:
        if self.control.transport is not None and self.control.close_reason is None:
            self.control.send_pool(count)

    def retire(self, conn_id: bytes) -> None:
        connection = self.pool.claim_quietly(conn_id)
        if connection is not None:
            connection.conn_id = None
            connection.transport.loseConnection()

    def close_idle(self) -> None:
        for connection in self.pool.flush():
            connection.transport.abortConnection()


class TunnelConnection(SwitchingProtocol):
    """A connection on the tunnel port after TLS (if any): reads the first
    frame and becomes a control channel or an idle pool connection."""

    conn_id: bytes | None = None
    session: ServerSession | None = None

    def __init__(self, server: "TunnelServer", gate: "TunnelGate"):
        self.server = server
        self.gate = gate
        self.decoder = FrameDecoder(allowed=frozenset({Type.HELLO, Type.POOL_AUTH}))

    def header_received(self, data: bytes) -> None:
        if self.conn_id is not None:
            self._idle_data(data)
            return
        try:
            frames = self.decoder.feed(data, max_frames=1)
        except ProtocolError as e:
            self.gate.refuse(str(e))
            return
        if not frames:
            return
        frame, rest = frames[0], self.decoder.take_rest()
        if frame.type is Type.HELLO:
            try:
                self.server.guard.may_try_key(self.gate.host)  # answer a banned source before CHALLENGE
            except Refused as e:
                self.gate.turn_away(self.transport, e)
                return
            control = self.gate.control = ServerControlProtocol(
                self.server.key, tlsmod.local_fingerprint(self.transport), self.server.session_config,
                self.server.clock,
                on_session=self._control_authenticated, on_lost=self.server.control_lost,
                handshake_timeout=self.server.settings.handshake_timeout,
                may_try_key=self.gate.may_try_key, key_failed=self.gate.key_failed,
            )
            self.switch_to(control, encode(frame.type, frame.payload) + rest)
            return
        session = self.server.session
        if len(frame.payload) != POOL_AUTH_SIZE:
            self.gate.refuse("malformed POOL_AUTH")
            return
        if session is None or not hmac.compare_digest(frame.payload[:ID], session.session.session_id):
            # A client whose session just ended (server restart, replaced,
            # declared dead) still dials for it: refuse, but do not count it
            # against the address -- a forger cannot get past the MAC below.
            self.gate.refuse("pool connection for no current session", penalize=False)
            return
        try:
            conn_id = session.authenticator.verify(frame, tlsmod.local_fingerprint(self.transport))
        except HandshakeError as e:
            # A guess at the session's 256-bit key (or a replay): counted,
            # never a ban -- that would let anyone who saw a session id lock
            # the session's own pool connections out.
            self.gate.refuse(e.reason, kind="pool_auth")
            return
        self.gate.passed()
        if rest or not session.pool.has_room(conn_id) or not self.server.room_for_idle(session.pool):
            # The client waits for POOL_OK before it sends anything more; a
            # full pool, a reused id or no descriptor to spare gets no
            # POOL_OK, so no user uses it.
            self.transport.abortConnection()
            return
        # State and POOL_OK first: add() may hand this connection to a
        # waiting user at once, and POOL_OK must precede the user's bytes.
        self.conn_id, self.session = conn_id, session
        self.transport.write(POOL_OK)
        session.pool.add(conn_id, self)

    def _control_authenticated(self, control: ServerControlProtocol) -> None:
        self.gate.passed()
        self.server.control_authenticated(control)

    def _idle_data(self, data: bytes) -> None:
        """Bytes on an idle pool connection: in the send flow, the client
        starts a connection with OPEN(own id, addresses); anything else is
        a violation."""
        if self.server.flow != "send":
            self.server.log.debug("unexpected data on an idle pool connection; closing it")
            self._drop_idle()
            return
        # The start frame may arrive with the user's first bytes; the
        # decoder holds at most one read beyond a (tiny) TCP frame.
        self.decoder.allowed = OPENS
        try:
            frames = self.decoder.feed(data, max_frames=1)
            if not frames:
                return
            conn_id, addresses = decode_open(frames[0].payload)
        except ProtocolError:
            self._drop_idle()
            return
        if conn_id != self.conn_id:
            self._drop_idle()
            return
        rest = self.decoder.take_rest()
        if frames[0].type is Type.OPEN_UDP:
            stream = self.server.udp_egress.open(addresses)
            if stream is None:
                self._drop_idle()
                return
            self.session.pool.remove(self.conn_id)
            self.hand_over(stream, rest)
            return
        if not self.server.settings.tcp:
            self.server.log.debug("TCP is disabled here (--no-tcp); closing a TCP pool connection")
            self._drop_idle()
            return
        self.session.pool.remove(self.conn_id)
        inbound = self.server.target_factory.buildProtocol(None)
        inbound.original = addresses  # the user's, for --proxy-protocol
        self.hand_over(inbound, rest)

    def _drop_idle(self) -> None:
        self.session.pool.remove(self.conn_id)
        self.conn_id = None
        self.transport.abortConnection()

    def claim_for(self, inbound) -> None:
        """Receive flow: relay user connection *inbound* over this connection,
        which starts with OPEN(its id, the user's addresses)."""
        source, destination = user_addresses(inbound)
        greeting = encode_open(self.conn_id, source, destination)
        self.hand_over(OutboundProtocol(inbound, greeting=greeting))

    def hand_over(self, protocol, data: bytes = b"") -> None:
        """This pool connection stops being idle: *protocol* owns it now."""
        self.conn_id = None
        self.switch_to(protocol, data)

    def header_lost(self, reason) -> None:
        if self.conn_id is not None:
            self.session.pool.remove(self.conn_id)
        self.gate.lost(reason)


class TunnelGate(SwitchingProtocol):
    """The raw accepted socket: guard, deadline, TLS detection."""

    admitted = False
    _passed = False
    _turned_away = False
    ticket = None  # the guard's, while admitted
    control = None  # the control protocol, once the first frame was HELLO

    def __init__(self, server: "TunnelServer"):
        self.server = server

    def connectionMade(self) -> None:
        self.host = self.transport.getPeer().host
        try:
            self.ticket = self.server.guard.admit(self.host, self._evicted)
        except Refused as e:
            self.server.log.debug("tunnel connection from {host} refused: {reason}", host=self.host, reason=e.text)
            self.transport.abortConnection()
            return
        self.admitted = True
        enable_keepalive(self.transport)
        self.deadline = self.server.clock.callLater(self.server.settings.handshake_timeout, self._expired)

    def _evicted(self) -> None:
        """The guard gave this connection's slot to a newcomer from a source
        holding fewer: close it; our own doing, not the peer's failure."""
        self._passed = True
        if self.deadline.active():
            self.deadline.cancel()
        self.server.log.debug("tunnel connection from {host} evicted: the handshake cap is full and its "
                              "address holds the most pending handshakes", host=self.host)
        self.transport.abortConnection()

    def _expired(self) -> None:
        if self._turned_away or self.control is not None and self.control.close_reason is not None:
            # Refused and told why, but the peer never finished the close
            # (a TLS close waits for its close_notify): end it now.
            self.lost()
            self.transport.abortConnection()
            return
        self.refuse("handshake timed out", kind="timeout")

    def may_try_key(self) -> None:
        """The control channel is about to evaluate a key."""
        try:
            self.server.guard.may_try_key(self.host)
        except Refused as e:
            raise HandshakeError(TRY_LATER, e.text) from None

    def key_failed(self) -> None:
        """The key just evaluated was wrong: counted now, not at the close."""
        ban = self.server.guard.key_failed(self.host)
        if ban is not None:
            self.server.banned(ban)

    def header_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        inner = TunnelConnection(self.server, self)
        level = self.server.settings.tls
        if data[0] == TLS_RECORD:
            if not level:
                self.refuse("TLS offered but this server runs --tls 0", kind="tls")
                return
            wrapped = HalfCloseTLSProtocol(self.server.tls_factory, inner)
            self.switch_to(wrapped, data)
        elif level:
            code = TLS_REQUIRED[level]
            self.transport.write(encode(Type.ERROR, encode_text(code, f"this server requires TLS (level {level})")))
            self.transport.loseConnection()
            self.server.plain_clients.plain(self.host, self.transport.getPeer().port)
            self._finish(False, "no_tls")  # counted by reason; never a penalty (a learning client does it once)
        else:
            self.switch_to(inner, data)

    def passed(self) -> None:
        """The tunnel handshake (control or pool) succeeded."""
        self._finish(True)

    def refuse(self, reason: str, penalize: bool = True, kind: str = "protocol") -> None:
        self.server.log.debug("tunnel connection from {host} refused: {reason}", host=self.host, reason=reason)
        self._finish(False if penalize else None, kind)
        self.transport.abortConnection()

    def turn_away(self, transport, refusal: Refused) -> None:
        """A control connection (HELLO) its source may not make now: tell
        the peer why (a client behind the same address as a guesser learns
        it must wait), then close."""
        self.server.log.debug("control connection from {host} refused: {reason}", host=self.host,
                              reason=refusal.text)
        transport.write(encode(Type.ERROR, encode_text(TRY_LATER, refusal.text)))
        transport.loseConnection()
        # The slot and the deadline stay until the connection is gone: under
        # TLS the close waits for the peer's close_notify, which it may
        # never send.
        self._turned_away = True

    def lost(self, reason=None) -> None:
        """The connection ended before its handshake passed: the control
        channel says why it refused, if it got that far; a failed TLS
        handshake (*reason*) is ``tls``."""
        control, kind = self.control, "closed"
        if control is None and tls_failed(reason):
            kind = "tls"
            self.server.log.debug("TLS handshake with {host} failed: {reason}", host=self.host,
                                  reason=tls_error_text(reason))
        if self._turned_away or control is not None and control.close_code == TRY_LATER:
            self._finish(None)  # refused by the guard: already counted there, says nothing new
            return
        if control is not None:
            if control.close_code == AUTH_FAILED:
                kind = "auth"  # a key was tried, and it was wrong
            elif control.close_reason == "handshake timed out":
                kind = "timeout"
            elif control.close_reason is not None:
                kind = "protocol"
        self._finish(False, kind)

    def _finish(self, succeeded: bool | None, kind: str = "closed") -> None:
        """Release the guard once: True passed, False failed (counted by
        *kind*; only a wrong key, ``auth``, counts towards a ban), None
        neither (a refusal that says nothing about the peer)."""
        if self.admitted and not self._passed:
            self._passed = True
            deadline = self.deadline
            if deadline.active():
                deadline.cancel()
            self.server.guard.release(self.ticket)
            if succeeded is False:
                self.server.handshake_failures += 1
                self.server.failures_by_reason[kind] += 1

    def header_lost(self, reason) -> None:
        self.lost()

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.lost()


class _GateFactory(ServerFactory):
    noisy = False

    def __init__(self, server: "TunnelServer"):
        self.server = server

    def buildProtocol(self, addr):
        return TunnelGate(self.server)


class PoolRelayFactory(PoolDialFactory):
    """Receive flow: each accepted user connection takes an idle pool
    connection instead of dialling a remote."""

    unavailable = "no client is connected"

    def __init__(self, server: "TunnelServer", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server = server

    def current_pool(self):
        session = self.server.session
        return session.pool if session is not None else None

    def use(self, conn_id: bytes, connection, inbound) -> None:
        current = self.server.session
        if current is not None and current.control.close_reason is None:
            current.control.send_tcp(conn_id)  # advisory: OPEN on the connection is what counts
        connection.claim_for(inbound)


class TunnelServer(Service):
    """The whole server: tunnel listener, target listener or dialler,
    current session, TLS material, periodic health events."""

    log = Logger(namespace="tunnelpass.server")
    probe = None  # --lbs: the target group's latency probe (tunnelpass.probe)

    def __init__(self, settings: ServerSettings, reactor, clock=None):
        self.settings = settings
        self.reactor = reactor
        self.clock = clock or reactor
        self.key = settings.key.encode()
        self.stats = ListenerStats()
        self.guard = HandshakeGuard(self.clock, settings.max_handshakes, settings.max_handshakes_per_source)
        self.session: ServerSession | None = None
        self.replacements = SessionReplacements(self.clock)
        self.plain_clients = PlainClients(self.clock, settings.tls)  # plain bytes at a TLS server
        self.flow = settings.flow
        self.fingerprint = b""
        self.tls_factory = None
        self.tunnel_port = None
        self.target_port = None
        self.udp_port = None
        self.udp_ingress: UDPIngress | None = None
        self.udp_egress: UDPEgress | None = None
        self.udp_stats = ListenerStats()
        self.handshake_failures = 0
        self.failures_by_reason = dict.fromkeys(FAILURE_REASONS, 0)
        self._cert_stamp = None
        self._loops: list[LoopingCall] = []
        self._orphans: list = []  # users waiting for a pool while no session is up
        self.signals = Signals(reactor)
        self.descriptors = Descriptors(self.clock)
        self.pool_bound = settings.max_pool  # --max-pool within the open-files budget (set at startup)

    # Startup

    def privilegedStartService(self) -> None:
        self.descriptors.set_limit(raise_fd_limit())
        self.pool_bound = self.descriptors.pool_bound(self.settings.max_pool)
        # Before anything is bound: a SIGTERM that arrives while starting up
        # (before the reactor runs) must still mean an orderly exit 0.  The
        # reactor installs its own handlers when it starts; ours go back on
        # once it runs (``_running``).
        self.signals.install_stop()
        try:
            self._load_tls()
        except (tlsmod.CertificateError, OSError) as e:
            raise SystemExit(f"tunnelpass: {e}") from None
        s = self.settings
        try:
            self.tunnel_port = listen_tcp(self.reactor, s.tunnel_port, _GateFactory(self), LISTEN_BACKLOG,
                                          s.tunnel_host, self.descriptors, name="tunnel")
        except CannotListenError as e:
            raise SystemExit(f"tunnelpass: {listen_error('--tunnel', s.tunnel_host, s.tunnel_port, e)}") from None
        # --block judges users where they connect, not the tunnel connections this side dials for.
        dial_limits = dataclasses.replace(s.limits, block="")
        relay_args = (self.reactor, "target", s.target_host, s.target_port, dial_limits, self.stats)
        if self.flow == "auto" and len(s.targets) > 1:
            self.flow = "send"  # a group is dialled, never listened on
        if self.flow in ("auto", "receive"):
            try:
                self._listen_public()
                self.flow = "receive"
            except CannotListenError as e:
                for port in (self.target_port, self.udp_port):
                    if port is not None:
                        port.stopListening()
                self.target_port = self.udp_port = self.udp_ingress = None
                if self.flow == "receive":
                    self.tunnel_port.stopListening()
                    raise SystemExit(
                        f"tunnelpass: {listen_error('--target', s.target_host, s.target_port, e)}") from None
                self.log.info("flow auto: {reason}; so the send flow (dial --target)",
                              reason=listen_error("--target", s.target_host, s.target_port, e))
                self.flow = "send"
        if self.flow == "send":
            targets = list(s.targets) or [(s.target_host, s.target_port)]
            self.target_factory = TCPForwardFactory(*relay_args, clock=self.clock, zero_copy=s.zero_copy,
                                                    remotes=targets)
            self.target_factory.limit_name = "slot"
            self.udp_egress = UDPEgress(self.reactor, "target", targets, s.limits, self.udp_stats, s.udp_buffer,
                                        clock=self.clock, tcp_factory=self.target_factory, enabled=s.udp)
            self.udp_egress.descriptors = self.descriptors
        self.target_factory.descriptors = self.descriptors
        self.session_config = SessionConfig(
            flow=FLOWS[self.flow], tls=s.tls, max_pool=min(self.pool_bound, 0xFFFF),
            heartbeat_ms=max(100, min(600_000, int(s.heartbeat * 1000))),
        )
        super().privilegedStartService()

    def _listen_public(self) -> None:
        """Receive flow: users connect to --target, over TCP and UDP (each
        unless disabled); CannotListenError if either cannot be bound."""
        s = self.settings
        public_limits = dataclasses.replace(s.limits, accept_proxy=s.accept_proxy)
        factory = self.target_factory = PoolRelayFactory(
            self, self.reactor, "target", s.target_host, s.target_port, public_limits, self.stats,
            clock=self.clock, zero_copy=s.zero_copy)
        if s.tcp:
            self.target_port = listen_tcp(self.reactor, s.target_port, factory, LISTEN_BACKLOG, s.target_host,
                                          self.descriptors, self.stats, "target")
        if s.udp:
            self.udp_ingress = UDPIngress(
                "target", self.clock, s.limits, self.udp_stats, s.udp_buffer, factory.current_pool,
                self._claim_for_datagrams, unavailable=factory.unavailable, tcp_factory=factory)
            self.udp_port = listen_udp(self.reactor, s.target_host, s.target_port, self.udp_ingress,
                                       beside=self.target_port)

    def _claim_for_datagrams(self, conn_id: bytes, connection, stream) -> None:
        connection.hand_over(stream)

    def _load_tls(self) -> None:
        s = self.settings
        if s.tls == 0:
            return
        if s.tls == 1:
            saved = s.state_dir and (os.path.exists(os.path.join(s.state_dir, "tunnelpass.crt"))
                                     or os.path.exists(os.path.join(s.state_dir, "tunnelpass.crt.bak")))
            if saved:
                pair = tlsmod.load_saved_pair(s.state_dir)
            else:
                key, certificate = tlsmod.self_signed()
                if s.state_dir:
                    os.makedirs(s.state_dir, mode=0o700, exist_ok=True)
                    tlsmod.save_pair(s.state_dir, key, certificate)
                pair = (key, [certificate])
        else:
            pair = tlsmod.load_pair(s.cert, s.private_key)
            self._cert_stamp = _stamp(s.cert, s.private_key)
        self._install_pair(*pair)

    def _install_pair(self, key, chain) -> None:
        options = tlsmod.server_options(key, chain)
        self.fingerprint = tlsmod.fingerprint(chain[0])
        if self.tls_factory is None:
            self._current_options = _CurrentOptions(options)
            self.tls_factory = HalfCloseTLSFactory(self._current_options, False, Factory())
        else:
            self._current_options.current = options

    def startService(self) -> None:
        super().startService()
        s = self.settings
        if s.report_interval:
            self._every(s.report_interval, self.report)
        self.probe = start_probe(  # --lbs 1/2 over a target group (send flow)
            self.reactor, [self.target_factory.group] + ([self.udp_egress.group] if self.udp_egress else []),
            "target", s.report_interval, s.limits.connect_timeout, clock=self.clock, dialer=s.limits.dialer)
        if s.tls == 2 and s.reload_interval:
            self._every(s.reload_interval, self.reload_certificate)
        self.signals.install(signal.SIGHUP, self.reload_certificate)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        # "server running" comes once our SIGTERM handler is in place.
        self.signals.install_stop()
        s = self.settings
        self.log.info(
            "server running: tunnel {tunnel}, flow {flow}, target {target}, tls {tls}{pin}",
            tunnel=format_address(s.tunnel_host, self.tunnel_port.getHost().port), flow=self.flow,
            target=format_address(s.target_host, s.target_port), tls=s.tls,
            pin=f", certificate {tlsmod.format_pin(self.fingerprint)}" if s.tls else "",
            event="server_running",
        )
        self.descriptors.log_pool_bound(s.max_pool)
        if s.key_generated:
            self._log_client_command()

    def _log_client_command(self, addresses=None) -> None:
        """The client command with a token another machine can use: see
        :func:`tunnelpass.hostaddrs.choose_public` for the address."""
        from tunnelpass.hostaddrs import choose_public, host_addresses
        from tunnelpass.urls import make_token

        s = self.settings
        port = self.tunnel_port.getHost().port
        choice = choose_public(s.tunnel_host, port, host_addresses() if addresses is None else addresses,
                               s.public_address)
        token = make_token(choice.host, choice.port, s.key, self.fingerprint if s.tls == 1 else None, tls=s.tls)
        self.log.warn(
            "no --key given: generated one. Start the client with: "
            "twistd -n --pidfile= tunnelpass --mode client --token {token} --target HOST:PORT",
            token=token, event="client_command", address=format_address(choice.host, choice.port),
        )
        if choice.loopback_only:
            self.log.warn("the token carries {address}: this host has only loopback addresses, so only a client "
                          "on this host can use it; give --public-address HOST[:PORT] for another machine",
                          address=choice.host, event="token_address")
        elif s.public_address is None and s.tunnel_host in ("0.0.0.0", "::", ""):
            self.log.info("the token carries {address} ({why}); other addresses of this host: {others}. "
                          "Choose with --public-address HOST[:PORT] (a NAT's public address, a DNS name)",
                          address=choice.host, why=choice.why, others=", ".join(choice.others) or "none",
                          event="token_address")

    def _every(self, interval: float, function) -> None:
        loop = LoopingCall(function)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    # Sessions

    def control_authenticated(self, control: ServerControlProtocol) -> None:
        old, self.session = self.session, ServerSession(self, control)
        if old is not None:
            self.replacements.replaced(old.control, control)
            old.close_idle()
            old.control.replaced()
            self._orphans.extend(old.pool.waiters)
            old.pool.waiters.clear()
        # Users who were waiting for the previous session's pool (a client
        # reconnecting, or a replaced session) wait for this one instead,
        # within their own --pool-timeout.
        waiting = [d for d in self._orphans if not d.called]
        self._orphans.clear()
        if waiting:
            self.session.pool.waiters.extend(waiting)
            self.session.pool.want_more(len(waiting))
        peer = control.transport.getPeer()
        self.plain_clients.learned(peer.host)
        self.log.info("client {host} connected (session {sid})", host=peer.host,
                      sid=control.session.session_id.hex()[:8], event="client_connected")

    def room_for_idle(self, pool) -> bool:
        """Whether to file one more idle pool connection: each idle one will
        need a descriptor more once a user takes it (the user's socket, or
        the target dialled for it), so near the open-files limit one is
        refused -- unless a user already waits for it."""
        if any(not waiter.called for waiter in pool.waiters):
            return True
        room = self.descriptors.headroom(len(pool.idle) + 1)
        return room is None or room >= 0

    def banned(self, ban: Ban) -> None:
        """The guard banned a source: an operator must see it (once per
        source per window; every ban is counted in ``bans``)."""
        if ban.log:
            self.log.warn("banned {address} from control connections for {duration:g} s: {reason} "
                          "(pool connections of a live session still pass)",
                          address=ban.source, duration=ban.duration, reason=ban.reason, event="handshake_ban")

    def control_lost(self, control: ServerControlProtocol) -> None:
        session = self.session
        if session is not None and session.control is control:
            self.session = None
            session.close_idle()
            self._orphans.extend(session.pool.waiters)
            session.pool.waiters.clear()
            self.log.info("client disconnected: {reason}", reason=control.close_reason or "connection closed",
                          event="client_disconnected")

    # Operations

    def report(self, final: bool = False) -> None:
        session = self.session
        fields = tunnel_fields(self.stats, self.udp_stats)
        self.log.info(
            "health: client={client} pool_idle={pool_idle} active={active} connect_failures={connect_failures} "
            "blocked={blocked} session_replacements={session_replacements} bytes_in={bytes_in} "
            "bytes_out={bytes_out} udp_sessions={udp_sessions} udp_drops={udp_drops} "
            "udp_evictions={udp_evictions} rtt_ms={rtt_ms} "
            "handshake_failures={handshake_failures} handshakes_pending={handshakes_pending} "
            "handshake_evictions={handshake_evictions} bans={bans}",
            event="health", client=session is not None, session_replacements=self.replacements.count,
            pool_idle=len(session.pool.idle) if session else 0,
            rtt_ms=round(session.control.rtt * 1000, 3) if session and session.control.rtt is not None else None,
            handshake_failures=self.handshake_failures, handshake_refused=sum(self.guard.refused.values()),
            handshake_refused_by_reason=dict(self.guard.refused), handshakes_pending=self.guard.pending,
            handshake_evictions=self.guard.evictions, bans=self.guard.bans,
            pool_timeouts=session.pool.timeouts if session else 0, final=final,
            handshake_failures_by_reason=dict(self.failures_by_reason), **fields,
        )

    def metrics(self) -> list:
        """What ``--metrics`` exposes."""
        session = self.session
        rtt = session.control.rtt if session is not None else None
        return tunnel_samples(self.stats, self.udp_stats, "server") + [
            Sample("client_connected", "gauge", "1 while a client session is up", int(session is not None)),
            Sample("session_replacements", "counter", "sessions replaced by a newer one with the same key",
                   self.replacements.count),
            Sample("pool_idle", "gauge", "idle pool connections", len(session.pool.idle) if session else 0),
            Sample("pool_waiting", "gauge", "user connections waiting for a pool connection",
                   sum(1 for w in session.pool.waiters if not w.called) if session else 0),
        ] + [
            Sample("handshake_failures", "counter", "failed tunnel handshakes, by reason", count, {"reason": reason})
            for reason, count in self.failures_by_reason.items()
        ] + [
            Sample("handshake_refused", "counter", "connections refused by the handshake guard, by reason", count,
                   {"reason": reason})
            for reason, count in self.guard.refused.items()
        ] + [
            Sample("handshakes_pending", "gauge", "unauthenticated connections (handshakes in progress)",
                   self.guard.pending),
            Sample("handshakes_pending_top_source", "gauge",
                   "handshakes in progress held by the source (address, IPv6 /64) holding the most",
                   self.guard.top_source_pending),
            Sample("handshake_evictions", "counter",
                   "pending handshakes closed to admit a source holding fewer (the overall cap was full)",
                   self.guard.evictions),
            Sample("bans", "counter", "sources banned from control connections after repeated wrong keys",
                   self.guard.bans),
            Sample("rtt_seconds", "gauge", "control channel round-trip time (NaN before the first PONG)",
                   rtt if rtt is not None else float("nan")),
        ] + self.descriptors.samples(pool=self.pool_bound) + rate_samples(self.settings.limits.limiter)

    def reload_certificate(self) -> bool:
        """tls=2: adopt the cert/key files if they changed and are a valid pair."""
        s = self.settings
        if s.tls != 2:
            return False
        stamp = _stamp(s.cert, s.private_key)
        if stamp == self._cert_stamp:
            return False
        try:
            key, chain = tlsmod.load_pair(s.cert, s.private_key)
        except tlsmod.CertificateError as e:
            self.log.error("certificate reload failed, keeping the current one: {error}", error=str(e))
            return False
        self._cert_stamp = stamp
        self._install_pair(key, chain)
        self.log.info("certificate reloaded: {pin}", pin=tlsmod.format_pin(self.fingerprint), event="cert_reloaded")
        return True

    def stopService(self) -> Deferred:
        self.signals.bound_stop(self.settings.shutdown_timeout)
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.probe is not None:
            self.probe.stop()
        waits = [self.tunnel_port.stopListening()]
        for port in (self.target_port, self.udp_port):
            if port is not None:
                waits.append(port.stopListening())
        if self.udp_egress is not None:
            self.udp_egress.close_all()
        session = self.session
        if session is not None:
            session.close_idle()
            session.control.shutdown()
        d = DeferredList([w or succeed(None) for w in waits])
        d.addCallback(lambda _: self.target_factory.drain(self.settings.shutdown_timeout))
        d.addCallback(lambda _: self.report(final=True))
        d.addBoth(lambda result: (self.signals.restore(), result)[1])
        return d


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentOptions:
    """TLS connections from whichever options are current, so a reloaded
    certificate applies to new connections and live ones keep theirs."""

    def __init__(self, options):
        self.current = options

    def serverConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.current.getContext(), None)
        connection.set_app_data(tls_protocol)
        connection.set_accept_state()
        return connection


def listen_error(what: str, host: str, port: int, error: CannotListenError) -> str:
    return f"{what}: {cannot_listen(format_address(host, port), error)}"


def _stamp(*paths):
    return tuple(file_stamp(path) for path in paths)
