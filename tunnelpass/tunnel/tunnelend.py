# -*- test-case-name: tests.test_tunnelend -*-
"""What both ends of a tunnel share: :class:`TunnelEnd`, the base of
:class:`~tunnelpass.tunnel.server.TunnelServer` and
:class:`~tunnelpass.tunnel.client.TunnelClient`.

* Lifecycle: ``privilegedStartService`` adopts the open-files budget and
  binds (the subclass's :meth:`TunnelEnd.bind`); ``startService`` starts
  the child services and the target group's probe; ``stopService`` stops
  listening, lets the subclass close its session, stops the children, then
  drains every live relay for at most ``--shutdown-timeout`` and logs the
  final health line.
* Periodic work (health lines, certificate checks, pool refill) runs in
  :class:`Periodic` children (``TimerService``), and the client's
  reconnecting ``ClientService`` is a child too: starting and stopping the
  end starts and stops them, nothing keeps a list of loops.
* :meth:`TunnelEnd.listen_pair` binds a TCP listener and a UDP socket on the
  same address (``--target`` of the receive flow, the client's listener in
  the send flow): both or neither.

No signal handlers and no process exit here: a failed start raises
:class:`~tunnelpass.ops.starterror.StartupError`, and the root service
(:mod:`tunnelpass.tap`) owns the signals and calls :meth:`reload`.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, succeed
from twisted.internet.error import CannotListenError

from tunnelpass.ops.fdbudget import Descriptors
from tunnelpass.ops.fdport import listen_tcp
from tunnelpass.config.limits import Limits
from tunnelpass.ops.memreturn import memory_return_service
from tunnelpass.relay.udp import MAX_DATAGRAM
from tunnelpass.ops.osutil import raise_fd_limit
from tunnelpass.relay.probe import start_probe
from tunnelpass.ops.stats import ListenerStats
from tunnelpass.tunnel.udptunnel import listen_udp

LISTEN_BACKLOG = 1024


@dataclass(frozen=True, kw_only=True)
class EndSettings:
    """The settings both tunnel ends have (keyword-only: each end's own
    fields come first)."""

    max_pool: int = 1024
    pool_timeout: float = 5.0
    handshake_timeout: float = 5.0
    report_interval: float = 60.0  # health lines (--report-interval); the heartbeat is separate
    shutdown_timeout: float = 5.0
    limits: Limits = Limits()
    zero_copy: bool = True
    targets: tuple = ()  # a target group (default: the one target)
    tcp: bool = True  # --no-tcp: do not carry TCP
    udp: bool = True  # --no-udp: do not carry UDP
    udp_buffer: int = MAX_DATAGRAM  # largest datagram carried (bytes)


class Periodic(TimerService):
    """A ``TimerService`` whose first call comes one *step* after the start
    (``TimerService`` itself calls at once: a health line at startup would
    say nothing)."""

    def __init__(self, step: float, function, name: str, clock):
        super().__init__(step, self._tick)
        self.function = function
        self.clock = clock
        self.setName(name)
        self._first = True

    def startService(self) -> None:
        self._first = True
        super().startService()

    def _tick(self) -> None:
        if self._first:
            self._first = False
            return
        self.function()


class TunnelEnd(MultiService):
    """The base of both tunnel ends: settings, counters, the descriptor
    budget, child services and the orderly stop.  Subclasses give
    :meth:`bind`, :meth:`running`, :meth:`close_session`,
    :meth:`probed_groups`, :meth:`report` and :meth:`drained_factories`."""

    probe = None  # --lbs: the target group's latency probe (tunnelpass.relay.probe)

    def __init__(self, settings, reactor, clock=None):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.clock = clock or reactor
        self.key = settings.key.encode()
        self.stats = ListenerStats()
        self.udp_stats = ListenerStats()
        self.descriptors = Descriptors(self.clock)
        self.pool_bound = settings.max_pool  # --max-pool within the open-files budget (set at startup)
        if settings.report_interval:
            self.every(settings.report_interval, self.report, "report")
        memory_return_service(self.live_connections, self.opened_connections,
                              self.clock).setServiceParent(self)  # named "memory"

    def live_connections(self) -> int:
        """Tunnelled TCP connections and UDP sessions now: after a burst of
        them ends, the heap is trimmed (:mod:`tunnelpass.ops.memreturn`)."""
        return self.stats.active + self.udp_stats.udp_sessions

    def opened_connections(self) -> int:
        """Tunnelled TCP connections and UDP sessions ever opened."""
        return self.stats.accepted + self.udp_stats.udp_sessions_total

    def every(self, interval: float, function, name: str) -> Periodic:
        """Call *function* every *interval* seconds while the end runs."""
        timer = Periodic(interval, function, name, self.clock)
        timer.setServiceParent(self)
        return timer

    # Start

    def privilegedStartService(self) -> None:
        self.descriptors.set_limit(raise_fd_limit())
        self.pool_bound = self.descriptors.pool_bound(self.settings.max_pool)
        self.bind()
        super().privilegedStartService()

    def bind(self) -> None:
        """Bind what the end listens on; raise StartupError if it cannot."""

    def startService(self) -> None:
        super().startService()
        s = self.settings
        groups = self.probed_groups()
        if groups:
            self.probe = start_probe(  # --lbs 1/2 over a target group
                self.reactor, groups, "target", s.report_interval, s.limits.connect_timeout,
                clock=self.clock, dialer=s.limits.dialer)
        self.reactor.callWhenRunning(self.announce)

    def probed_groups(self) -> list:
        return []

    def announce(self) -> None:
        """The reactor runs: log the "running" line."""

    def listen_pair(self, host: str, port: int, factory, datagrams, name: str, stats=None):
        """A TCP listener (*factory*, unless ``--no-tcp``) and a UDP socket
        beside it (*datagrams*, a DatagramProtocol, unless ``--no-udp``)
        on *host*:*port*; ``(tcp_port, udp_port)``, either None when not
        carried.  CannotListenError if either cannot be bound, with the
        other released."""
        s = self.settings
        tcp_port = udp_port = None
        try:
            if s.tcp:
                tcp_port = listen_tcp(self.reactor, port, factory, LISTEN_BACKLOG, host, self.descriptors, stats,
                                      name)
            if s.udp and datagrams is not None:
                udp_port = listen_udp(self.reactor, host, port, datagrams, beside=tcp_port)
        except CannotListenError:
            if tcp_port is not None:
                tcp_port.stopListening()
            raise
        return tcp_port, udp_port

    # Stop

    def stopService(self):
        children = super().stopService()  # timers, the reconnecting service
        if self.probe is not None:
            self.probe.stop()
        waits = [children] + [port.stopListening() for port in self.listening_ports() if port is not None]
        self.close_session()
        d = DeferredList([w or succeed(None) for w in waits])
        timeout = self.settings.shutdown_timeout
        d.addCallback(lambda _: DeferredList([f.drain(timeout) for f in self.drained_factories()]))
        d.addCallback(lambda _: self.report(final=True))
        return d

    def listening_ports(self) -> list:
        return []

    def close_session(self) -> None:
        """The end stops: close the session and idle pool connections."""

    def drained_factories(self) -> list:
        """The relay factories whose live connections the stop drains."""
        return []

    def report(self, final: bool = False) -> None:
        """Log a health line."""

    def reload(self) -> None:
        """SIGHUP (dispatched by the root service)."""
