# -*- test-case-name: tests.test_targets -*-
"""The latency probe behind ``--lbs 1`` and the failback gate of ``--lbs 2``.

Every round (each report interval, and once at start) it opens a TCP
connection to each target its :class:`~tunnelpass.relay.targets.TargetGroup`
asks about, times the connect, and closes it at once; the result goes to
:meth:`~tunnelpass.relay.targets.TargetGroup.probed` of every group given (the TCP
and the UDP side of one target list share one probe).  Bounded: at most one
probe in flight per target, each with a connect timeout.  The decisions
are the group's (sans-IO); this is only the Twisted adapter, plus the log
lines an operator needs when traffic moves to another target.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelpass.config.settings import format_address, is_ip_literal
from tunnelpass.relay.targets import STRATEGIES

#: Probe every this many seconds when the report interval is 0 (off).
DEFAULT_INTERVAL = 5.0


class _Probe(Protocol):
    def __init__(self, done):
        self.done = done

    def connectionMade(self) -> None:
        self.done(True)
        self.transport.loseConnection()


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self, done):
        self.done = done

    def buildProtocol(self, addr):
        return _Probe(self.done)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.done(False)


class LatencyProbe:
    """Probes *groups* (same targets, same strategy) every *interval*."""

    log = Logger(namespace="tunnelpass.targets")

    def __init__(self, reactor, groups: list, name: str, interval: float, timeout: float,
                 clock=None, dialer=None):
        self.reactor, self.clock = reactor, clock or reactor
        self.groups, self.group = groups, groups[0]
        self.name, self.dialer = name, dialer
        self.interval = interval or DEFAULT_INTERVAL
        self.timeout = min(timeout, self.interval)
        self.in_flight: dict[int, object] = {}
        self._loop = None
        self._preferred = None
        self.group.on_switch = self._switched

    def start(self) -> None:
        self._loop = LoopingCall(self.round)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for pending in list(self.in_flight.values()):
            try:
                pending.cancel() if hasattr(pending, "cancel") else pending.stopConnecting()
            except Exception:
                pass
        self.in_flight.clear()

    def round(self) -> None:
        for index in self.group.to_probe():
            if index not in self.in_flight:
                self._probe(index)

    def _probe(self, index: int) -> None:
        host, port = self.group.targets[index]
        started = self.clock.seconds()
        finished = False

        def done(connected: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.in_flight.pop(index, None)
            self.result(index, self.clock.seconds() - started if connected else None)

        dialer = self.dialer
        if is_ip_literal(host) and (dialer is None or dialer.fits(host)):
            self.in_flight[index] = self.reactor.connectTCP(
                host, port, _ProbeFactory(done), timeout=self.timeout,
                bindAddress=dialer.bind_address if dialer else None)
            return
        factory = Factory.forProtocol(lambda: _Probe(done))
        factory.noisy = False
        if dialer is not None:
            d = dialer.connect_tcp(host, port, factory, self.timeout)
        else:
            d = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout).connect(factory)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(lambda _: done(False))
        if not finished:
            self.in_flight[index] = d

    def result(self, index: int, latency: float | None) -> None:
        """One probe's outcome, to every group; logs a change of the
        preferred target (lbs=1)."""
        for group in self.groups:
            group.probed(index, latency)
        if self.group.strategy != 1:
            return
        preferred = self.group.preferred()
        if preferred != self._preferred and self.group.latency[preferred] is not None:
            self._preferred = preferred
            latency = self.group.latency[preferred]
            self.log.info("{listener}: lowest latency target is now {target} ({latency_ms} ms)",
                          listener=self.name, target=self._target(preferred),
                          latency_ms=round(latency * 1000, 3) if latency != float("inf") else None,
                          event="target_preferred")

    def _switched(self, old: int, new: int) -> None:
        """lbs=2: the group moved to another target (failover or failback)."""
        if new == 0:
            self.log.warn("{listener}: primary target {target} is back; failing back from {previous}",
                          listener=self.name, target=self._target(0), previous=self._target(old),
                          event="target_failback")
        else:
            self.log.warn("{listener}: target {previous} failed; using backup {target} "
                          "(the primary is tried again after {fallback:g} s)",
                          listener=self.name, target=self._target(new), previous=self._target(old),
                          fallback=self.group.fallback, event="target_failover")

    def _target(self, index: int) -> str:
        return format_address(*self.group.targets[index])




def start_probe(reactor, groups: list, name: str, interval: float, timeout: float, clock=None, dialer=None):
    """A started :class:`LatencyProbe` for a group that needs one (``--lbs``
    1 or 2 with two or more targets), else None."""
    group = groups[0]
    if group.strategy == 0 or len(group.targets) < 2:
        return None
    probe = LatencyProbe(reactor, groups, name, interval, timeout, clock=clock, dialer=dialer)
    probe.log.info("{listener}: load balancing {strategy} over {count} targets", listener=name,
                   strategy=STRATEGIES[group.strategy], count=len(group.targets), event="lbs")
    probe.start()
    return probe
