# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""``--mode server``: the public end of a tunnel.

One TCP port (``--tunnel``) takes every connection a client makes.  Its
first byte says what it is: ``0x16`` starts TLS (when the server has a TLS
level), anything else must be a tunnel frame -- HELLO opens a control
channel, POOL_AUTH files an idle data connection.  Until then the
connection is unauthenticated: it counts against the handshake guard (caps
per source and overall, with fair eviction when the overall cap is reached;
a ban on control connections after repeated wrong keys) and one deadline
covers TLS and the tunnel handshake together.  That gate is
:mod:`tunnelpass.tunnel.gate`; the certificate is :mod:`tunnelpass.tunnel.servertls`, the
health line and metrics :mod:`tunnelpass.tunnel.serverreport`.  This module is the
service: its listeners, the current client session and the stop.

Flows: *receive* (reverse tunnel) listens on ``--target`` for users and
hands each one an idle pool connection; *send* (forward tunnel) dials
``--target`` for each pool connection the client starts.  One client
session at a time: a newly authenticated one replaces the old at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.tunnel.control import ServerControlProtocol
from tunnelpass.tunnel.guard import Ban, HandshakeGuard
from tunnelpass.wire.handshake import FLOWS, MUX_CARRIER, PoolAuthenticator, SessionConfig
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.tunnel.replacement import SessionReplacements
from tunnelpass.tunnel.gatelog import PlainClients
from tunnelpass.ops.fdport import listen_tcp
from tunnelpass.tunnel.gate import FAILURE_REASONS, _GateFactory
from tunnelpass.ops.osutil import listen_error
from tunnelpass.tunnel.serverreport import ServerReporting
from tunnelpass.tunnel.servertls import ServerCertificate
from tunnelpass.config.settings import format_address
from tunnelpass.ops.starterror import StartupError
from tunnelpass.tunnel.dispatch import OpenDispatcher
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.carriers.muxopener import CarrierSet, MuxOpener
from tunnelpass.tunnel.pooldial import PoolDialFactory
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.tunnel.tunnelend import LISTEN_BACKLOG, EndSettings, TunnelEnd
from tunnelpass.tunnel.udptunnel import UDPIngress


@dataclass(frozen=True)
class ServerSettings(EndSettings):
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
    heartbeat: float = 5.0
    reload_interval: float = 3600.0
    max_handshakes: int = 1024
    max_handshakes_per_source: int = 256
    public_address: tuple | None = None  # --public-address (host, port or None): what the token carries
    accept_proxy: tuple = ()  # trusted load balancers in front of the public listener
    carrier_type: int = 0  # --type: 0 TCP pool, 3 HTTP/2 multiplexed (announced to the client)


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
            connection.close()

    def close_idle(self) -> None:
        for connection in self.pool.flush():
            connection.transport.abortConnection()


class TunnelServer(ServerReporting, ServerCertificate, TunnelEnd):
    """The whole server: tunnel listener, target listener or dialler,
    current session, TLS material, periodic health events."""

    log = Logger(namespace="tunnelpass.server")

    def __init__(self, settings: ServerSettings, reactor, clock=None):
        super().__init__(settings, reactor, clock)
        if settings.tls == 2 and settings.reload_interval:
            self.every(settings.reload_interval, self.reload_certificate, "certificate")
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
        self.handshake_failures = 0
        self.failures_by_reason = dict.fromkeys(FAILURE_REASONS, 0)
        self._cert_stamp = None
        self._orphans: list = []  # users waiting for a pool while no session is up
        self.carriers = CarrierSet(self.clock, settings.pool_timeout)  # --type 3: the HTTP/2 connections

    # Startup

    def bind(self) -> None:
        try:
            self._load_tls()
        except (tlsmod.CertificateError, OSError) as e:
            raise StartupError(str(e)) from None
        s = self.settings
        try:
            self.tunnel_port = listen_tcp(self.reactor, s.tunnel_port, _GateFactory(self), LISTEN_BACKLOG,
                                          s.tunnel_host, self.descriptors, name="tunnel",
                                          tls_context=self.tls_context if s.tls else None)
        except CannotListenError as e:
            raise StartupError(listen_error("--tunnel", s.tunnel_host, s.tunnel_port, e)) from None
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
                self.target_port = self.udp_port = self.udp_ingress = None
                if self.flow == "receive":
                    self.tunnel_port.stopListening()
                    raise StartupError(listen_error("--target", s.target_host, s.target_port, e)) from None
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
            self.acceptor = OpenDispatcher(self.target_factory, self.udp_egress, s.tcp)
        self.target_factory.descriptors = self.descriptors
        self.session_config = SessionConfig(
            flow=FLOWS[self.flow], tls=s.tls, max_pool=min(self.pool_bound, 0xFFFF),
            heartbeat_ms=max(100, min(600_000, int(s.heartbeat * 1000))), carrier=s.carrier_type,
        )

    def _listen_public(self) -> None:
        """Receive flow: users connect to --target, over TCP and UDP (each
        unless disabled); CannotListenError if either cannot be bound."""
        s = self.settings
        public_limits = dataclasses.replace(s.limits, accept_proxy=s.accept_proxy)
        factory = self.target_factory = PoolDialFactory(
            self.reactor, "target", s.target_host, s.target_port, public_limits, self.stats,
            clock=self.clock, zero_copy=s.zero_copy)
        if s.carrier_type == MUX_CARRIER:
            factory.opener = MuxOpener(lambda: self.carriers, "no client is connected")
        else:
            factory.opener = PoolOpener(self._current_pool, "no client is connected")
        ingress = UDPIngress(
            "target", self.clock, s.limits, self.udp_stats, s.udp_buffer, factory.opener,
            tcp_factory=factory) if s.udp else None
        self.target_port, self.udp_port = self.listen_pair(s.target_host, s.target_port, factory, ingress,
                                                           "target", self.stats)
        self.udp_ingress = ingress

    def _current_pool(self):
        session = self.session
        return session.pool if session is not None else None

    def probed_groups(self) -> list:
        """--lbs 1/2 probes the target group of the send flow."""
        return [self.target_factory.group] + ([self.udp_egress.group] if self.udp_egress else [])

    def reload(self) -> None:
        """SIGHUP: re-read the certificate (tls=2)."""
        self.reload_certificate()

    def announce(self) -> None:
        # The root's SIGTERM handler is in place before this line (tunnelpass.tap).
        s = self.settings
        self.log.info(
            "server running: tunnel {tunnel}, flow {flow}, target {target}, tls {tls}, type {carrier}{pin}",
            tunnel=format_address(s.tunnel_host, self.tunnel_port.getHost().port), flow=self.flow,
            target=format_address(s.target_host, s.target_port), tls=s.tls, carrier=s.carrier_type,
            pin=f", certificate {tlsmod.format_pin(self.fingerprint)}" if s.tls else "",
            event="server_running",
        )
        self.descriptors.log_pool_bound(s.max_pool)
        self._log_client_command()

    def _log_client_command(self, addresses=None) -> None:
        """The client command with a token another machine can use: see
        :func:`tunnelpass.relay.hostaddrs.choose_public` for the address."""
        from tunnelpass.relay.hostaddrs import choose_public, host_addresses
        from tunnelpass.config.urls import make_token

        s = self.settings
        port = self.tunnel_port.getHost().port
        choice = choose_public(s.tunnel_host, port, host_addresses() if addresses is None else addresses,
                               s.public_address)
        address = format_address(choice.host, choice.port)
        what = "the token" if s.key_generated else "the client command"
        if s.key_generated:
            token = make_token(choice.host, choice.port, s.key, self.fingerprint if s.tls == 1 else None, tls=s.tls)
            self.log.warn(
                "no --key given: generated one. Start the client with: "
                "twistd -n --pidfile= tunnelpass --mode client --token {token} --target HOST:PORT",
                token=token, event="client_command", address=address,
            )
        else:
            # The operator chose the key: it stays out of the log; the
            # command says where the key goes.
            verify = {0: "", 1: f" --pin {tlsmod.format_pin(self.fingerprint)}", 2: " --tls 2"}[s.tls]
            self.log.info(
                "start the client with: twistd -n --pidfile= tunnelpass --mode client --tunnel {address} "
                "--key \"$KEY\"{verify} --target HOST:PORT (the server's key; a token is logged only for a "
                "generated key)", address=address, verify=verify, event="client_command")
        if choice.loopback_only:
            self.log.warn("{what} carries {address}: this host has only loopback addresses, so only a client "
                          "on this host can use it; give --public-address HOST[:PORT] for another machine",
                          what=what, address=choice.host, event="token_address")
        elif s.public_address is None and s.tunnel_host in ("0.0.0.0", "::", ""):
            self.log.info("{what} carries {address} ({why}); other addresses of this host: {others}. "
                          "Choose with --public-address HOST[:PORT] (a NAT's public address, a DNS name)",
                          what=what, address=choice.host, why=choice.why,
                          others=", ".join(choice.others) or "none", event="token_address")

    # Sessions

    def control_authenticated(self, control: ServerControlProtocol) -> None:
        old, self.session = self.session, ServerSession(self, control)
        self.carriers.retire_all()  # the old session's: their streams finish, new ones go to this session's
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
            self.carriers.retire_all()
            self._orphans.extend(session.pool.waiters)
            session.pool.waiters.clear()
            self.log.info("client disconnected: {reason}", reason=control.close_reason or "connection closed",
                          event="client_disconnected")

    # Stop (tunnelpass.tunnel.tunnelend.TunnelEnd.stopService)

    def listening_ports(self) -> list:
        return [self.tunnel_port, self.target_port, self.udp_port]

    def close_session(self) -> None:
        if self.udp_egress is not None:
            self.udp_egress.close_all()
        session = self.session
        if session is not None:
            session.close_idle()
            session.control.shutdown()
        self.carriers.retire_all()  # streams being drained go on; the last one closes its carrier
        self.carriers.fail_waiters("the server is stopping")

    def carrier_lost(self, mux, reason) -> None:
        self.carriers.lost(mux)
        if self.running:
            self.log.info("{name} ended: {why}", name=mux.name, event="carrier_lost",
                          why=reason.getErrorMessage() if reason is not None else "closed")

    def drained_factories(self) -> list:
        return [self.target_factory]
