# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""``--mode client``: the private end of a tunnel.

It keeps one control connection to the server (Twisted's ``ClientService``
reconnects it with capped, jittered backoff, re-resolving the server's name
each attempt; :mod:`tunnelpass.reachlog` says why an attempt failed) and a pool of idle, individually authenticated data
connections sized by :class:`~tunnelpass.poolpolicy.PoolPolicy`.

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
(:mod:`tunnelpass.tlslevel`), so a forged answer cannot lock a client out.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from tunnelpass import tls as tlsmod
from tunnelpass.codec import OPENS, FrameDecoder, ProtocolError, Type, decode_open, encode, encode_open
from tunnelpass.control import ClientControlProtocol
from tunnelpass.keepalive import enable_keepalive
from tunnelpass.metrics import Sample, rate_samples, tunnel_samples
from tunnelpass.handshake import FLOWS, ID, pool_auth_frame
from tunnelpass.pool import IdlePool
from tunnelpass.probe import start_probe
from tunnelpass.reachlog import Reachability, ReconnectingService, handshake_failure, retry_delay
from tunnelpass.reachlog import connect_failure as reachlog_connect_failure
from tunnelpass.poolpolicy import PoolPolicy
from tunnelpass.relay import OutboundProtocol, TCPForwardFactory, user_addresses
from tunnelpass.rules import Limits
from tunnelpass.stats import ListenerStats, tunnel_fields
from tunnelpass.fdbudget import Descriptors, ran_out
from tunnelpass.fdport import listen_tcp
from tunnelpass.forward import raise_fd_limit
from tunnelpass.server import listen_error
from tunnelpass.settings import format_address
from tunnelpass.signals import Signals
from tunnelpass.pooldial import PoolDialFactory
from tunnelpass.switch import SwitchingProtocol
from tunnelpass.tlshalf import HalfCloseTLSEndpoint, HalfCloseTLSFactory
from tunnelpass.tlslevel import TLSLevel
from tunnelpass.udp import MAX_DATAGRAM, UDPForwardProtocol
from tunnelpass.udptunnel import UDPEgress, UDPIngress, listen_udp

LISTEN_BACKLOG = 1024
POOL_OK = encode(Type.POOL_OK)
_FLOW_NAMES = {number: name for name, number in FLOWS.items()}


@dataclass(frozen=True)
class ClientSettings:
    server_host: str
    server_port: int
    target_host: str
    target_port: int
    key: str = ""
    flow: str = "auto"  # auto | tunnel | local | receive | send (the last two refuse the other flow)
    tls: int | None = None  # the server's TLS level, when the user gave it (--tls, or a token)
    min_pool: int = 64
    max_pool: int = 1024
    pin: bytes | None = None
    ca: str | None = None
    sni: str | None = None
    pool_timeout: float = 5.0
    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    report_interval: float = 60.0  # health lines (--report-interval); the heartbeat is separate
    shutdown_timeout: float = 5.0
    limits: Limits = Limits()
    zero_copy: bool = True
    targets: tuple = ()  # a target group for the receive flow (default: the one target)
    tcp: bool = True  # --no-tcp: do not carry TCP
    udp: bool = True  # --no-udp: do not carry UDP
    udp_buffer: int = MAX_DATAGRAM  # largest datagram carried (bytes)
    dial_reason: str = "from --tunnel"  # why server_host:server_port (a token's, or --tunnel over it)


@implementer(IHandshakeListener)
class PoolConnection(SwitchingProtocol):
    """One client pool connection: authenticates, idles, then relays."""

    ready = False  # the server filed it (POOL_OK received)
    authenticated = False  # POOL_AUTH sent

    def __init__(self, client: "TunnelClient", session, counter: int, conn_id: bytes):
        self.client, self.session = client, session
        self.counter, self.conn_id = counter, conn_id
        self._ack = b""
        self._open_decoder = FrameDecoder(allowed=OPENS)

    def connectionMade(self) -> None:
        enable_keepalive(self.transport)
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._authenticate()

    def handshakeCompleted(self) -> None:
        self._authenticate()

    def _authenticate(self) -> None:
        if self.session is not self.client.session:
            self.transport.loseConnection()  # dialled for a session that has ended
            return
        fp = tlsmod.peer_fingerprint(self.transport)
        self.transport.write(pool_auth_frame(self.session, self.counter, self.conn_id, fp))
        self.authenticated = True

    def header_received(self, data: bytes) -> None:
        if not self.ready:
            # Only a connection the server has filed goes to the idle pool:
            # one it refused (full, busy) never carries a user's bytes.
            needed = len(POOL_OK) - len(self._ack)
            self._ack += data[:needed]
            data = data[needed:]
            if not POOL_OK.startswith(self._ack) or not self.authenticated:
                self.transport.abortConnection()
                return
            if len(self._ack) < len(POOL_OK):
                return
            self.ready = True
            self.client.pool_connected(self)
            if not data or not self.transport.connected:
                return
            if self.delegate is not None:  # a waiting user took it at once
                self.delegate.dataReceived(data)
                return
        # Receive flow: the server claimed this connection; it starts with
        # OPEN(own id, the user's addresses), then the user's bytes -- or
        # OPEN_UDP, then the user's datagrams.
        client = self.client
        try:
            frames = self._open_decoder.feed(data, max_frames=1)
            if not frames:
                return
            conn_id, addresses = decode_open(frames[0].payload)
        except ProtocolError:
            self.transport.abortConnection()
            return
        if (conn_id != self.conn_id or client.flow != "receive" or client.pool is None
                or client.pool.claim(self.conn_id) is not self):
            self.transport.abortConnection()
            return
        rest = self._open_decoder.take_rest()
        if frames[0].type is Type.OPEN_UDP:
            protocol = client.udp_egress.open(addresses)
        elif client.settings.tcp:
            protocol = client.target_factory.buildProtocol(None)
            protocol.original = addresses  # the user's, for --proxy-protocol
        else:
            client.log.debug("TCP is disabled here (--no-tcp); closing a TCP pool connection")
            protocol = None
        if protocol is None:
            client.retiring.discard(self.conn_id)
            self.transport.abortConnection()
            return
        self.start_relay(protocol, rest)

    def start_relay(self, protocol, data: bytes = b"") -> None:
        client = self.client
        client.retiring.discard(self.conn_id)
        self.switch_to(protocol, data)
        client.policy_used()  # refill after the user's target dial is under way

    def header_lost(self, reason) -> None:
        self.client.pool_lost(self)


class _PoolConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, client, session, counter, conn_id):
        self.args = (client, session, counter, conn_id)

    def buildProtocol(self, addr):
        return PoolConnection(*self.args)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.args[0].pool_dial_failed(self.args[3], reason)


class SendFlowFactory(PoolDialFactory):
    """Send flow: each local user connection takes an idle pool connection,
    which starts with OPEN (its id, the user's addresses)."""

    unavailable = "not connected to the server"

    def __init__(self, client: "TunnelClient", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client = client

    def current_pool(self):
        return self.client.pool

    def use(self, conn_id: bytes, connection, inbound) -> None:
        self.client.policy_used()
        source, destination = user_addresses(inbound)
        connection.switch_to(OutboundProtocol(inbound, greeting=encode_open(conn_id, source, destination)))


@implementer(IStreamClientEndpoint)
class _ServerEndpoint:
    """The server's address with whatever TLS level is current, rebuilt per
    attempt (the level can change after a "TLS required" answer, and
    ``HostnameEndpoint`` re-resolves the name every time)."""

    def __init__(self, client: "TunnelClient"):
        self.client = client

    def connect(self, factory):
        d = self.client.endpoint().connect(factory)
        d.addErrback(self.client.connect_failed)
        return d

    def __repr__(self) -> str:
        s = self.client.settings
        return f"tunnelpass server {format_address(s.server_host, s.server_port)}"


def known_level(settings: ClientSettings) -> int | None:
    """The server's TLS level as the user told it, if they did."""
    if settings.tls is not None:
        return settings.tls
    if settings.pin:
        return 1
    if settings.ca or settings.sni:
        return 2
    return None


class TunnelClient(Service):
    log = Logger(namespace="tunnelpass.client")
    probe = None  # --lbs: the target group's latency probe (tunnelpass.probe)

    def __init__(self, settings: ClientSettings, reactor, clock=None):
        self.settings = settings
        self.reactor = reactor
        self.clock = clock or reactor
        self.key = settings.key.encode()
        self.stats = ListenerStats()
        self.levels = TLSLevel(known_level(settings))
        self.session_level = None  # the TLS level of the current session
        self.session = None
        self.control = None
        self.pool: IdlePool | None = None
        self.policy: PoolPolicy | None = None
        self.dialing = 0
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
        self.udp_stats = ListenerStats()
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
        self.descriptors = Descriptors(self.clock)
        self.pool_bound = settings.max_pool  # --max-pool within the open-files budget (set at startup)
        self.target_factory.descriptors = self.udp_egress.descriptors = self.descriptors
        self._loops: list[LoopingCall] = []
        self.service = None
        self.signals = Signals(reactor)
        self.reach = Reachability(self.clock, self.log, format_address(settings.server_host, settings.server_port))

    # Connecting

    def endpoint(self):
        s = self.settings
        endpoint = HostnameEndpoint(self.reactor, s.server_host, s.server_port, timeout=s.connect_timeout)
        level = self.levels.current
        if level == 0:
            return endpoint
        return HalfCloseTLSEndpoint(self._creator(level), endpoint)

    def _creator(self, level: int):
        """The TLS client side for *level*: pinned (or channel-bound) for 1,
        chain and name verified for 2; made once per level."""
        creator = self._creators.get(level)
        if creator is None:
            s = self.settings
            if level == 1:
                creator = tlsmod.PinnedClientCreator(s.pin)
            else:
                creator = tlsmod.verified_client_creator(s.sni or s.server_host, s.ca)
            self._creators[level] = creator
        return creator

    def reload(self) -> None:
        """SIGHUP: re-read ``--ca`` (new connections use it; a bad file keeps
        the current one).  Nothing else a client uses is read from a file."""
        s = self.settings
        if not s.ca:
            self.log.info("SIGHUP: nothing to reload (no --ca; key, pin and addresses are read at start only)")
            return
        try:
            creator = tlsmod.verified_client_creator(s.sni or s.server_host, s.ca)
        except tlsmod.CertificateError as e:
            self.log.error("SIGHUP: --ca reload failed, keeping the current CA certificates: {error}", error=str(e))
            return
        self._creators[2] = creator
        self.log.info("SIGHUP: reloaded --ca {path}", path=s.ca, event="ca_reloaded")

    def _retry_delay(self, attempts: int) -> float:
        delay = 0.0 if self._retry_now else retry_delay(attempts + self.failures)
        self._retry_now = False
        self.reach.retrying(delay)
        return delay

    def connect_failed(self, failure):
        """A TCP connect to the server failed (ClientService retries)."""
        self.reach.failed(reachlog_connect_failure(failure.value))
        return failure

    def privilegedStartService(self) -> None:
        self.descriptors.set_limit(raise_fd_limit())
        self.pool_bound = self.descriptors.pool_bound(self.settings.max_pool)
        # Before anything is bound: a SIGTERM that arrives while starting up
        # (before the reactor runs) must still mean an orderly exit 0.  The
        # reactor installs its own handlers when it starts; ours go back on
        # once it runs (``_running``).
        self.signals.install_stop()
        s = self.settings
        if self.levels.known == 2 and s.flow != "local":
            try:
                self._creator(2)  # a bad --ca is a startup error, not a retry loop
            except tlsmod.CertificateError as e:
                raise SystemExit(f"tunnelpass: --ca: {e}") from None
        if s.flow == "local":
            # Single-end forwarding: --tunnel is the local listener, no server.
            self.local_factory = self.target_factory
            try:
                if s.tcp:
                    self.listening_port = listen_tcp(self.reactor, s.server_port, self.local_factory,
                                                     LISTEN_BACKLOG, s.server_host, self.descriptors, self.stats,
                                                     "local")
                if s.udp:
                    relay = UDPForwardProtocol(self.reactor, "local", s.target_host, s.target_port, s.limits,
                                               self.udp_stats, clock=self.clock)
                    relay.descriptors = self.descriptors
                    self.udp_port = listen_udp(self.reactor, s.server_host, s.server_port, relay,
                                               beside=self.listening_port)
            except CannotListenError as e:
                if self.listening_port is not None:
                    self.listening_port.stopListening()
                raise SystemExit(
                    f"tunnelpass: {listen_error('--tunnel', s.server_host, s.server_port, e)}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        s = self.settings
        if s.report_interval:
            self._every(s.report_interval, self.report)
        self.probe = start_probe(  # --lbs 1/2 over a target group (receive flow)
            self.reactor, [self.target_factory.group, self.udp_egress.group], "target", s.report_interval,
            s.limits.connect_timeout, clock=self.clock, dialer=s.limits.dialer)
        self.signals.install(signal.SIGHUP, self.reload)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        self.signals.install_stop()
        s = self.settings
        if s.flow == "local":
            self.log.info("client running (local forwarding): {listen} -> {target}",
                          listen=format_address(s.server_host, s.server_port),
                          target=format_address(s.target_host, s.target_port), event="client_running")
            return
        factory = Factory.forProtocol(self._build_control)
        factory.noisy = False
        self.service = ReconnectingService(_ServerEndpoint(self), factory, retryPolicy=self._retry_delay,
                                           clock=self.clock)
        self.service.startService()
        self._every(1.0, self.fill)
        self.log.info("client running: server {server} ({dial_reason}), target {target}", event="client_running",
                      server=format_address(s.server_host, s.server_port), dial_reason=s.dial_reason,
                      target=format_address(s.target_host, s.target_port))
        self.descriptors.log_pool_bound(s.max_pool)

    def _every(self, interval, function) -> None:
        loop = LoopingCall(function)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    def _build_control(self):
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
        self.reach.connected()
        self.control, self.session = control, control.session
        peer = control.transport.getPeer()
        self.server_address = (peer.host, peer.port)
        self.policy = PoolPolicy(self.clock, min(self.settings.min_pool, self.settings.max_pool),
                                 self.settings.max_pool)
        self.policy.limit_max_pool(min(config.max_pool, self.pool_bound))
        self.pool = IdlePool(self.clock, self.policy.max_pool, self._want_more, timeout=self.settings.pool_timeout)
        self.flow = flow
        self.retiring: set[bytes] = set()
        self.log.info("connected to {server} (session {sid}, flow {flow}, tls {tls})",
                      server=format_address(self.settings.server_host, self.settings.server_port),
                      sid=control.session.session_id.hex()[:8], flow=flow, tls=level,
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
        factory = SendFlowFactory(self, self.reactor, "listen", s.server_host, s.server_port, s.limits,
                                  self.stats, clock=self.clock, zero_copy=s.zero_copy)
        try:
            if s.tcp:
                self.listening_port = listen_tcp(self.reactor, s.target_port, factory, LISTEN_BACKLOG, s.target_host,
                                                 self.descriptors, self.stats, "listen")
            if s.udp:
                ingress = UDPIngress("listen", self.clock, s.limits, self.udp_stats, s.udp_buffer,
                                     factory.current_pool, self._claim_for_datagrams,
                                     unavailable=factory.unavailable, tcp_factory=factory)
                self.udp_port = listen_udp(self.reactor, s.target_host, s.target_port, ingress,
                                           beside=self.listening_port)
        except CannotListenError:
            if self.listening_port is not None:
                self.listening_port.stopListening()
            self.listening_port = None
            raise
        self.local_factory = factory

    def _claim_for_datagrams(self, conn_id: bytes, connection, stream) -> None:
        self.policy_used()
        connection.switch_to(stream)

    def open_tcp(self, conn_id: bytes) -> None:
        """The TCP signal is advisory since the OPEN frame travels on the
        pool connection itself (in order after its POOL_OK): nothing to do."""

    def dial_pool(self, count: int) -> None:
        if self.policy is not None:
            self.policy.requested(count)
            self.fill()

    def flush_pool(self) -> None:
        if self.pool is not None:
            for connection in self.pool.flush():
                connection.transport.loseConnection()

    def control_lost(self, control) -> None:
        attempt_level = self.levels.current
        if control.session is None:
            self.levels.failed()  # whatever went wrong, the next attempt may try another level
            verdict = handshake_failure(control, attempt_level, self.levels, self.settings)
            if verdict.note:
                self.log.info(verdict.note)
            if verdict.reason:
                self.reach.failed(verdict.reason)
            self.failures += verdict.back_off
            self._retry_now = self._retry_now or verdict.retry_now
        if control is self.control:
            self.log.warn("lost the server: {reason}", reason=control.close_reason or "connection closed",
                          event="client_disconnected")
            self.reach.lost()
            self.control = self.session = None
            self.flush_pool()
            self.pool = None

    # Pool

    def _want_more(self, count: int) -> None:
        if self.policy is not None:
            self.policy.requested(count)
            self.fill_soon()

    def policy_used(self) -> None:
        if self.policy is not None and self.pool is not None:
            self.policy.used()
            self.fill_soon()

    def fill_soon(self) -> None:
        """Refill on the next reactor turn: user connections in flight go
        first, and claims that arrive together share one refill."""
        if self._fill_call is None:
            self._fill_call = self.clock.callLater(0, self._scheduled_fill)

    def _scheduled_fill(self) -> None:
        self._fill_call = None
        self.fill()

    def fill(self) -> None:
        if self.session is None or self.policy is None:
            return
        idle = len(self.pool.idle)
        surplus = min(self.policy.surplus(idle + self.dialing), idle)
        if surplus and self.flow == "send":
            # This side claims pool connections in the send flow: closing
            # an idle one cannot race a user connection.
            for _ in range(surplus):
                _, connection = self.pool.idle.popitem(last=False)
                connection.transport.loseConnection()
        elif surplus and self.control is not None:
            # Receive flow: the server claims; ask it to retire the oldest.
            for conn_id in list(self.pool.idle)[:surplus]:
                if conn_id not in self.retiring:
                    self.retiring.add(conn_id)
                    self.control.retire(conn_id)
        # Each pool connection, and the leg it will need once a user takes
        # it, must fit in the open-files limit next to the users' own.
        room = self.descriptors.dial_allowance(len(self.pool.idle) + self.dialing)
        for _ in range(self.policy.to_dial(len(self.pool.idle), self.dialing, room)):
            self._dial_one()

    def _dial_one(self) -> None:
        self.counter += 1
        self.dialing += 1
        self.descriptors.spend(1)
        conn_id = os.urandom(ID)
        # Straight to the address the control connection reached (no name
        # lookup per pool connection, and the same server behind a DNS
        # round robin); TLS as the control connection has it.
        factory = _PoolConnectionFactory(self, self.session, self.counter, conn_id)
        if self.session_level:
            factory = HalfCloseTLSFactory(self._creator(self.session_level), True, factory)
        host, port = self.server_address
        self.reactor.connectTCP(host, port, factory, timeout=self.settings.connect_timeout)

    def pool_dial_failed(self, conn_id: bytes, reason) -> None:
        self.dialing -= 1
        code = ran_out(reason)
        if code is not None:
            self.descriptors.ran_out("dial", code, listener="pool")
        self.log.debug("pool connection failed: {error}", error=reason.getErrorMessage())

    def pool_connected(self, connection: PoolConnection) -> None:
        self.dialing -= 1
        if self.pool is None or connection.session is not self.session:
            connection.transport.loseConnection()  # dialled for a session that has ended
        elif not self.pool.add(connection.conn_id, connection):
            connection.transport.loseConnection()

    def pool_lost(self, connection: PoolConnection) -> None:
        if not connection.ready:
            self.dialing -= 1  # connected but never authenticated (TLS failure, ...)
        elif self.pool is not None:
            self.pool.remove(connection.conn_id)
            self.retiring.discard(connection.conn_id)

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
        ] + self.descriptors.samples(pool=self.pool_bound) + rate_samples(self.settings.limits.limiter)

    def report(self, final: bool = False) -> None:
        fields = tunnel_fields(self.stats, self.udp_stats)
        self.log.info(
            "health: connected={connected} pool_idle={pool_idle} pool_target={pool_target} active={active} "
            "connect_failures={connect_failures} blocked={blocked} "
            "bytes_in={bytes_in} bytes_out={bytes_out} udp_sessions={udp_sessions} udp_drops={udp_drops} "
            "udp_evictions={udp_evictions}",
            event="health", connected=self.session is not None,
            pool_idle=len(self.pool.idle) if self.pool else 0,
            pool_target=self.policy.target if self.policy else 0, final=final, **fields,
        )

    def stopService(self):
        self.signals.bound_stop(self.settings.shutdown_timeout)
        super().stopService()
        if self._fill_call is not None and self._fill_call.active():
            self._fill_call.cancel()
        self._fill_call = None
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.probe is not None:
            self.probe.stop()
        waits = []
        for port in (self.listening_port, self.udp_port):
            if port is not None:
                waits.append(port.stopListening())
        self.udp_egress.close_all()
        if self.control is not None:
            # Do not wait for a TLS close_notify from a server that may be gone.
            self.control.transport.abortConnection()
        if self.service is not None:
            waits.append(self.service.stopService())
        self.flush_pool()
        d = DeferredList([w or succeed(None) for w in waits])
        factories = [self.target_factory] + ([self.local_factory] if self.local_factory not in
                                              (None, self.target_factory) else [])
        d.addCallback(lambda _: DeferredList([f.drain(self.settings.shutdown_timeout) for f in factories]))
        d.addCallback(lambda _: self.report(final=True))
        d.addBoth(lambda result: (self.signals.restore(), result)[1])
        return d
