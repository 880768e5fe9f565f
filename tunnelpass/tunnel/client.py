# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""``--mode client``: the private end of a tunnel.

It keeps one control connection to the server (Twisted's ``ClientService``
reconnects it with capped, jittered backoff, re-resolving the server's name
each attempt; :mod:`tunnelpass.tunnel.reachlog` says why an attempt failed) and a pool of idle, individually authenticated data
connections sized by :class:`~tunnelpass.tunnel.poolpolicy.PoolPolicy`.

* receive flow (reverse tunnel): the server names a pool connection with
  TCP(id), or simply starts sending user bytes on it; the client dials its
  ``--target`` and relays.
* send flow (forward tunnel): the client listens on its ``--target``; each
  user connection takes an idle pool connection, which is started with
  TCP(own id) and relayed; the server dials its own target.

The TLS level is the server's: a client told it (``--tls``, ``--pin``,
``--ca``/``--sni``, a token) uses only that level; one without TLS settings
first speaks plain, a TLS server answers "TLS required (level N)" and the
next attempt (at once) uses TLS -- pinned for level 1 (channel binding
protects it without a pin), chain and hostname verified for level 2.  What
an unauthenticated peer says only steers the next attempt
(:mod:`tunnelpass.tunnel.tlslevel`), so a forged answer cannot lock a client out.

This module is the service (session, listeners, stop); reaching the server
is :mod:`tunnelpass.tunnel.clientconnect`, the pool connections and their refill
:mod:`tunnelpass.tunnel.clientpool`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.tunnel.clientconnect import ServerConnecting, _ServerEndpoint, known_level
from tunnelpass.tunnel.clientpool import PoolKeeping
from tunnelpass.tunnel.muxdial import CarrierKeeping
from tunnelpass.carriers.muxopener import CarrierSet, MuxOpener, SessionOpener
from tunnelpass.tunnel.dispatch import OpenDispatcher
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.tunnel.pooldial import PoolDialFactory
from tunnelpass.carriers.poolstate import PendingCount
from tunnelpass.tunnel.control import ClientControlProtocol
from tunnelpass.ops.metrics import Sample, rate_samples, tunnel_samples
from tunnelpass.wire.handshake import FLOWS, MUX_CARRIER, REPLACED
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.tunnel.reachlog import REPLACED_PAUSE, Reachability, ReconnectingService, handshake_failure
from tunnelpass.tunnel.poolpolicy import PoolPolicy
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.tunnel.lifecycle import SessionLife
from tunnelpass.ops.stats import tunnel_fields
from tunnelpass.ops.osutil import listen_error
from tunnelpass.config.settings import format_address
from tunnelpass.ops.starterror import StartupError
from tunnelpass.tunnel.tlslevel import TLSLevel
from tunnelpass.relay.udp import UDPForwardProtocol
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.tunnel.tunnelend import EndSettings, TunnelEnd
from tunnelpass.tunnel.udptunnel import UDPIngress

_FLOW_NAMES = {number: name for name, number in FLOWS.items()}


@dataclass(frozen=True)
class ClientSettings(EndSettings):
    server_host: str
    server_port: int
    target_host: str
    target_port: int
    key: str = ""
    flow: str = "auto"  # auto | tunnel | local | receive | send (the last two refuse the other flow)
    tls: int | None = None  # the server's TLS level, when the user gave it (--tls, or a token)
    min_pool: int = 64
    pin: bytes | None = None
    ca: str | None = None
    sni: str | None = None
    connect_timeout: float = 5.0
    dial_reason: str = "from --tunnel"  # why server_host:server_port (a token's, or --tunnel over it)
    carrier_type: int | None = None  # --type: None follows the server's; 0 or 3 refuses another


class TunnelClient(ServerConnecting, CarrierKeeping, PoolKeeping, TunnelEnd):
    """The whole client: the reconnecting control connection (a
    ``ClientService`` child), the pool, the send-flow or local listener."""

    log = Logger(namespace="tunnelpass.client")

    def __init__(self, settings: ClientSettings, reactor, clock=None):
        super().__init__(settings, reactor, clock)
        self.levels = TLSLevel(known_level(settings))
        self.session_level = None  # the TLS level of the current session
        self.session = None
        self.control = None
        self.pool: IdlePool | None = None
        self.carriers = CarrierSet(self.clock, settings.pool_timeout)  # --type 3: the HTTP/2 connections
        self.carrier = None  # the carrier type of the current (or last) session
        self.policy: PoolPolicy | None = None
        self.pool_pending = PendingCount()  # pool connections dialling or authenticating
        self.counter = 0
        self._fill_call = None
        self.flow = None  # the server's, once a session starts
        self.retiring: set[bytes] = set()
        self.failures = 0
        self._retry_now = False
        self._creators: dict = {}  # TLS level -> client connection creator
        self.listening_port = None
        self.local_factory = None
        self.udp_port = None
        targets = list(settings.targets) or [(settings.target_host, settings.target_port)]
        # --block judges users where they connect: here only in the local flow (not tunnel connections).
        limits = settings.limits if settings.flow == "local" else dataclasses.replace(settings.limits, block="")
        self.target_factory = TCPForwardFactory(
            reactor, "target", settings.target_host, settings.target_port, limits, self.stats,
            clock=self.clock, zero_copy=settings.zero_copy, remotes=targets,
        )
        self.target_factory.limit_name = "slot"
        self.udp_egress = UDPEgress(reactor, "target", targets, settings.limits, self.udp_stats,
                                    settings.udp_buffer, clock=self.clock, tcp_factory=self.target_factory,
                                    enabled=settings.udp)
        self.acceptor = OpenDispatcher(self.target_factory, self.udp_egress, settings.tcp)  # receive flow
        self.target_factory.descriptors = self.udp_egress.descriptors = self.descriptors
        self.reach = Reachability(self.clock, self.log, format_address(settings.server_host, settings.server_port))
        self.life = SessionLife(self.clock)  # connecting -> handshaking -> up -> replaced/lost -> backing off
        self.service = None
        if settings.flow != "local":
            factory = Factory.forProtocol(self._build_control)
            factory.noisy = False
            self.service = ReconnectingService(_ServerEndpoint(self), factory, retryPolicy=self._retry_delay,
                                               clock=self.clock)
            self.service.setName("server")
            self.service.setServiceParent(self)
            self.every(1.0, self.fill, "fill")

    def bind(self) -> None:
        s = self.settings
        if self.levels.known == 2 and s.flow != "local":
            try:
                self._creator(2)  # a bad --ca is a startup error, not a retry loop
            except tlsmod.CertificateError as e:
                raise StartupError(f"--ca: {e}") from None
        if s.flow == "local":
            # Single-end forwarding: --tunnel is the local listener, no server.
            self.local_factory = self.target_factory
            relay = None
            if s.udp:
                relay = UDPForwardProtocol(self.reactor, "local", s.target_host, s.target_port, s.limits,
                                           self.udp_stats, clock=self.clock)
                relay.descriptors = self.descriptors
            try:
                self.listening_port, self.udp_port = self.listen_pair(s.server_host, s.server_port,
                                                                      self.local_factory, relay, "local", self.stats)
            except CannotListenError as e:
                raise StartupError(listen_error("--tunnel", s.server_host, s.server_port, e)) from None

    def probed_groups(self) -> list:
        """--lbs 1/2 probes the target group of the receive flow."""
        return [self.target_factory.group, self.udp_egress.group]

    def announce(self) -> None:
        s = self.settings
        if s.flow == "local":
            self.log.info("client running (local forwarding): {listen} -> {target}",
                          listen=format_address(s.server_host, s.server_port),
                          target=format_address(s.target_host, s.target_port), event="client_running")
            return
        self.log.info("client running: server {server} ({dial_reason}), target {target}", event="client_running",
                      server=format_address(s.server_host, s.server_port), dial_reason=s.dial_reason,
                      target=",".join(format_address(host, port) for host, port in s.targets)
                      or format_address(s.target_host, s.target_port))
        self.descriptors.log_pool_bound(s.max_pool)

    def session_event(self, event: str) -> None:
        """Move the session's :class:`~tunnelpass.tunnel.lifecycle.SessionLife`;
        an order the table does not know is logged (debug), not fatal."""
        if self.life.can(event):
            self.life.fire(event)
        else:
            self.log.debug("session: {event} in state {state} ignored", event=event, state=self.life.state)

    def _build_control(self):
        self.session_event("connected")
        return ClientControlProtocol(self.key, tlsmod.peer_fingerprint, self, self.clock,
                                     handshake_timeout=self.settings.handshake_timeout)

    # ClientControlProtocol handler

    def session_started(self, control) -> None:
        config = control.session.config
        level = self.levels.current
        if config.tls != level:
            # The config is covered by the session MAC: the server's own word.
            self.log.error("server announced tls={announced} on a tls={tls_level} connection; disconnecting",
                           announced=config.tls, tls_level=level)
            self.levels.failed()
            self._retry_now = self.levels.hint(config.tls)
            self.failures += 1
            control.transport.abortConnection()
            return
        if self.settings.carrier_type is not None and config.carrier != self.settings.carrier_type:
            self.log.error("the server runs --type {announced} but this client insists on --type {wanted}; "
                           "refusing the session", announced=config.carrier, wanted=self.settings.carrier_type)
            self.failures += 1  # back off: this will not change by itself
            control.transport.loseConnection()
            return
        flow = _FLOW_NAMES[config.flow]
        wanted = self.settings.flow
        if wanted in ("receive", "send") and flow != wanted:
            self.log.error("the server runs the {flow} flow but this client insists on --flow {wanted}; "
                           "refusing the session", flow=flow, wanted=wanted)
            self.failures += 1  # back off: this will not change by itself
            control.transport.loseConnection()
            return
        self.levels.succeeded(level)
        self.session_level = level
        self.failures = 0
        self._slow = False
        self.reach.connected()
        self.session_event("establish")
        self.control, self.session = control, control.session
        peer = control.transport.getPeer()
        self.server_address = (peer.host, peer.port)
        self.policy = PoolPolicy(self.clock, min(self.settings.min_pool, self.settings.max_pool),
                                 self.settings.max_pool)
        self.policy.limit_max_pool(min(config.max_pool, self.pool_bound))
        self.pool = IdlePool(self.clock, self.policy.max_pool, self._want_more, timeout=self.settings.pool_timeout)
        self.flow = flow
        self.carrier = config.carrier
        self.retiring: set[bytes] = set()
        self.log.info("connected to {server} (session {sid}, flow {flow}, tls {tls}, type {carrier})",
                      server=format_address(self.settings.server_host, self.settings.server_port),
                      sid=control.session.session_id.hex()[:8], flow=flow, tls=level, carrier=config.carrier,
                      event="client_connected")
        if flow == "send" and len(self.settings.targets) > 1:
            self.log.error("the server runs the send flow, where this client listens on --target; "
                           "a target group cannot be listened on")
            self.failures += 1  # back off: this will not change by itself
            control.transport.loseConnection()
            return
        if flow == "send" and self.local_factory is None:
            s = self.settings
            try:
                self._listen_send_flow()
            except CannotListenError as e:
                self.log.error("send flow: cannot listen on {target}: {error}",
                               target=format_address(s.target_host, s.target_port), error=str(e))
                control.transport.loseConnection()
                return
            self.log.info("send flow: listening on {target}", target=format_address(s.target_host, s.target_port))
        self.fill()

    def _listen_send_flow(self) -> None:
        """Send flow: users connect to this client's --target, over TCP and
        UDP (each unless disabled); both or neither."""
        s = self.settings
        factory = PoolDialFactory(self.reactor, "listen", s.server_host, s.server_port, s.limits,
                                  self.stats, clock=self.clock, zero_copy=s.zero_copy)
        pool_opener = PoolOpener(lambda: self.pool, "not connected to the server",
                                 on_claim=lambda conn_id: self.policy_used())
        mux_opener = MuxOpener(lambda: self.carriers, "not connected to the server")
        factory.opener = opener = SessionOpener(lambda: mux_opener if self.carrier == MUX_CARRIER else pool_opener)
        ingress = UDPIngress("listen", self.clock, s.limits, self.udp_stats, s.udp_buffer,
                             opener, tcp_factory=factory) if s.udp else None
        self.listening_port, self.udp_port = self.listen_pair(s.target_host, s.target_port, factory, ingress,
                                                              "listen", self.stats)
        self.local_factory = factory

    def dial_pool(self, count: int) -> None:
        if self.policy is not None:
            self.policy.requested(count)
            self.fill()

    def flush_pool(self) -> None:
        if self.pool is not None:
            for connection in self.pool.flush():
                connection.transport.loseConnection()

    def control_lost(self, control) -> None:
        if self.life.state in ("connecting", "handshaking"):
            self.session_event("fail")
        elif control is self.control:
            self.session_event("replaced" if control.close_code == REPLACED else "lose")
        attempt_level = self.levels.current
        if control.session is None:
            self.levels.failed()  # whatever went wrong, the next attempt may try another level
            verdict = handshake_failure(control, attempt_level, self.levels, self.settings)
            if verdict.note:
                self.log.info(verdict.note)
            if verdict.reason:
                self.reach.failed(verdict.reason)
            self.failures += verdict.back_off
            self._slow = verdict.slow
            self._retry_now = self._retry_now or verdict.retry_now
        if control is self.control:
            reason = control.close_reason or "connection closed"
            if control.close_code == REPLACED:
                # Another client holds this key: do not take the session
                # straight back (the server reports the fight either way).
                self._pause_next = REPLACED_PAUSE
                reason += f"; another client uses this key (reconnecting in about {REPLACED_PAUSE:g} s)"
            log = self.log.warn if self.running else self.log.info  # a stop is not a failure
            log("lost the server: {reason}", reason=reason, event="client_disconnected")
            self.reach.lost()
            self.control = self.session = None
            self.flush_pool()
            self.pool = None
            self.carriers.retire_all()  # their streams finish; new ones wait for the next session's

    # Operations

    def metrics(self) -> list:
        """What ``--metrics`` exposes."""
        pool, policy = self.pool, self.policy
        return tunnel_samples(self.stats, self.udp_stats, "client") + [
            Sample("server_connected", "gauge", "1 while the session with the server is up",
                   int(self.session is not None)),
            Sample("pool_idle", "gauge", "idle pool connections", len(pool.idle) if pool else 0),
            Sample("pool_target", "gauge", "idle pool connections the client aims for",
                   policy.target if policy else 0),
            Sample("pool_dialing", "gauge", "pool connections being dialled", self.dialing),
        ] + self.carriers.samples() + self.descriptors.samples(pool=self.pool_bound) + rate_samples(self.settings.limits.limiter)

    def report(self, final: bool = False) -> None:
        fields = tunnel_fields(self.stats, self.udp_stats)
        self.log.info(
            "health: connected={connected} pool_idle={pool_idle} pool_target={pool_target} active={active} "
            "connect_failures={connect_failures} blocked={blocked} "
            "bytes_in={bytes_in} bytes_out={bytes_out} udp_sessions={udp_sessions} udp_drops={udp_drops} "
            "udp_evictions={udp_evictions} carriers={carriers}",
            event="health", connected=self.session is not None, carriers=len(self.carriers),
            pool_idle=len(self.pool.idle) if self.pool else 0,
            pool_target=self.policy.target if self.policy else 0, final=final, **fields,
        )

    # Stop (tunnelpass.tunnel.tunnelend.TunnelEnd.stopService; the ClientService child stops with the end)

    def listening_ports(self) -> list:
        return [self.listening_port, self.udp_port]

    def close_session(self) -> None:
        self.session_event("stop")
        if self._fill_call is not None and self._fill_call.active():
            self._fill_call.cancel()
        self._fill_call = None
        self.udp_egress.close_all()
        if self.control is not None:
            # Do not wait for a TLS close_notify from a server that may be gone.
            self.control.transport.abortConnection()
        self.flush_pool()
        self.carriers.retire_all()  # streams being drained go on; the last one closes its carrier
        self.carriers.fail_waiters("the client is stopping")

    def drained_factories(self) -> list:
        return [self.target_factory] + ([self.local_factory] if self.local_factory not in
                                        (None, self.target_factory) else [])
