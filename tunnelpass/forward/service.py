# -*- test-case-name: tests.test_forward -*-
"""The static forwarder (``--mode forward``): rules file -> listening sockets.

Every endpoint of every rule (a rule with ``/tcp+udp`` has two) is one named
child service.  A reload parses and validates the whole file first, then
diffs by endpoint: unchanged endpoints keep their socket and connections,
changed remotes/limits are updated in place, removed endpoints stop
listening while their live connections finish, added ones start.

A reload that would remove every rule is refused (the running rules stay)
unless the file says ``# tunnelpass: empty``: an empty or truncated file is
far more often a half-written save than a wish to stop forwarding.  Every
removed rule is logged at warning level, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelpass.ops.fdbudget import Descriptors
from tunnelpass.ops.fdport import listen_tcp
from tunnelpass.ops.metrics import Sample, listener_samples, rate_samples
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.ops.starterror import StartupError
from tunnelpass.config.limits import Limits
from tunnelpass.ops.osutil import cannot_listen, file_stamp, raise_fd_limit
from tunnelpass.config.rules import EMPTY_MARKER, MAX_FILE_BYTES, Endpoint, Rule, RulesError, parse_rules
from tunnelpass.ops.stats import ListenerStats, StatsReporter
from tunnelpass.relay.udp import MAX_DATAGRAM, UDPForwardProtocol

log = Logger(namespace="tunnelpass.forward")

#: Pending connections the kernel queues per TCP listener.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class ForwardSettings:
    config: str = "etc/tunnelpass.conf"
    defaults: Limits = Limits()
    reload_interval: float = 0.0
    shutdown_timeout: float = 5.0
    report_interval: float = 60.0
    zero_copy: bool = True


def load_rules(path: str) -> list[Rule]:
    """Read and validate a rules file; :class:`RulesError` on any fault."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise RulesError(path, 0, f"cannot read rules file: {e.strerror or e}") from None
    return parse_rules(data, path)


def bind_error_message(endpoint: Endpoint, error: CannotListenError) -> str:
    return cannot_listen(str(endpoint), error)


class ListenerService(Service):
    """One listening endpoint of one rule and the relays it has accepted."""

    def __init__(self, endpoint: Endpoint, rule: Rule, defaults: Limits, reactor,
                 zero_copy: bool = True, descriptors: Descriptors | None = None):
        self.endpoint = endpoint
        self.descriptors = descriptors
        self.name = str(endpoint)
        self.reactor = reactor
        self.stats = ListenerStats()
        self.port = None
        self.rule = rule
        limits = rule.options.resolve(defaults)
        if endpoint.protocol == "tcp":
            self.relay = TCPForwardFactory(
                reactor, self.name, rule.remote_host, rule.remote_port, limits, self.stats,
                zero_copy=zero_copy,
            )
        else:
            self.relay = UDPForwardProtocol(
                reactor, self.name, rule.remote_host, rule.remote_port, limits, self.stats
            )
        self.relay.descriptors = descriptors

    def update(self, rule: Rule, defaults: Limits) -> bool:
        """Adopt *rule*'s remote and limits; return whether anything changed."""
        if _what_relays(rule) == _what_relays(self.rule):
            self.rule = rule
            return False
        self.rule = rule
        self.relay.update(rule.remote_host, rule.remote_port, rule.options.resolve(defaults))
        return True

    def privilegedStartService(self) -> None:
        # Bind here (before twistd drops privileges) and let CannotListenError
        # propagate: a busy port must fail startup, not become a log line.
        if self.port is None:
            host, port = self.endpoint.host, self.endpoint.port
            if self.endpoint.protocol == "tcp":
                self.port = listen_tcp(self.reactor, port, self.relay, LISTEN_BACKLOG, host,
                                       self.descriptors, self.stats, self.name)
            else:
                self.port = self.reactor.listenUDP(port, self.relay, host, MAX_DATAGRAM)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        log.info("listening on {listener} -> {remote}", listener=self.name, remote=self.rule.remote)

    def stopService(self):
        """Stop listening; live TCP relays go on (see :meth:`drain`)."""
        super().stopService()
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    def live(self) -> int:
        return len(self.relay.relays) if self.endpoint.protocol == "tcp" else len(self.relay.sessions)

    def drain(self, timeout: float):
        if self.endpoint.protocol == "tcp":
            return self.relay.drain(timeout)
        self.relay.close_all()
        return succeed(None)


class ForwarderService(MultiService):
    """All listeners of a rules file, reloadable on SIGHUP or file change."""

    def __init__(self, settings: ForwardSettings, rules: list[Rule], reactor):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.reporter = StatsReporter()
        self.retiring: set[ListenerService] = set()
        self._reloading = False
        self._reload_again = False
        self._config_stamp = self._stamp()
        self._timers: list[LoopingCall] = []
        self.descriptors = Descriptors(reactor)
        self.reloads = 0
        for endpoint, rule in _endpoints(rules):
            self._new_listener(endpoint, rule).setServiceParent(self)

    def _new_listener(self, endpoint: Endpoint, rule: Rule) -> ListenerService:
        return ListenerService(endpoint, rule, self.settings.defaults, self.reactor,
                               zero_copy=self.settings.zero_copy, descriptors=self.descriptors)

    def listeners(self) -> list[ListenerService]:
        return list(self) + list(self.retiring)

    def metrics(self) -> list:
        """What ``--metrics`` exposes: each listener's counters."""
        samples = []
        for listener in self.listeners():
            samples += listener_samples(listener.stats, {"listener": str(listener.endpoint),
                                                          "remote": listener.rule.remote})
        samples.append(Sample("reloads", "counter", "rules reloads applied", self.reloads))
        return samples + self.descriptors.samples() + rate_samples(self.settings.defaults.limiter)

    def privilegedStartService(self) -> None:
        self.descriptors.set_limit(raise_fd_limit())
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            for listener in self:
                if listener.port is not None:
                    listener.port.stopListening()
            failed = next(l.endpoint for l in self if l.port is None)
            raise StartupError(bind_error_message(failed, e)) from None

    def startService(self) -> None:
        super().startService()
        if self.settings.report_interval:
            self._start_timer(self._report, self.settings.report_interval)
        if self.settings.reload_interval:
            self._start_timer(self._check_config_changed, self.settings.reload_interval)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        # The root's SIGTERM/SIGINT handlers go back on before this runs
        # (tunnelpass.tap), so whoever waits for this line may signal at once.
        count = len(list(self))
        if count:
            log.info("forwarder running: {count} listener(s) from {config}",
                     count=count, config=self.settings.config)
        else:
            log.warn("forwarder running with no rules in {config}: add some and send SIGHUP",
                     config=self.settings.config)

    async def _stop(self) -> None:
        for timer in self._timers:
            if timer.running:
                timer.stop()
        await MultiService.stopService(self)
        draining = self.listeners()
        live = sum(listener.live() for listener in draining)
        if live:
            log.info(
                "draining {live} live connection(s) for up to {timeout}s",
                live=live, timeout=self.settings.shutdown_timeout,
            )
        await DeferredList([l.drain(self.settings.shutdown_timeout) for l in draining])
        self.reporter.report(draining, final=True)
        log.info("forwarder stopped")

    def stopService(self):
        return Deferred.fromCoroutine(self._stop())

    # Reload

    def reload(self) -> None:
        """Re-read the rules file; overlapping requests coalesce into one more pass."""
        if not self.running:
            log.info("reload ignored: the forwarder is stopping")
            return
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        d = Deferred.fromCoroutine(self._reload_until_settled())
        d.addErrback(lambda f: log.failure("reload failed", f))

    async def _reload_until_settled(self) -> None:
        try:
            while self.running:
                self._reload_again = False
                await self._reload_once()
                if not self._reload_again:
                    break
        finally:
            self._reloading = False

    async def _reload_once(self) -> None:
        path = self.settings.config
        self._config_stamp = self._stamp()
        try:
            rules = load_rules(path)
        except RulesError as e:
            log.error("reload rejected, keeping the current rules: {error}", error=str(e),
                      event="reload_rejected", path=path)
            return
        current = {listener.endpoint: listener for listener in self}
        if not rules and current and not getattr(rules, "meant_empty", False):
            log.warn("reload refused, keeping the current {running} listener(s): {path} has no rules "
                     "(empty or half-written?); if no rules is meant, put the line '{marker}' in it",
                     event="reload_refused", path=path, running=len(current), marker=EMPTY_MARKER)
            return
        wanted = dict(_endpoints(rules))
        removed = [l for endpoint, l in current.items() if endpoint not in wanted]
        added = [(e, r) for e, r in wanted.items() if e not in current]
        updated = [
            current[e] for e, r in wanted.items()
            if e in current and current[e].update(r, self.settings.defaults)
        ]
        for listener in removed:
            self.retiring.add(listener)
            await maybeDeferred(self.removeService, listener)
            log.warn(
                "rule removed: {listener} -> {remote} ({live} live connection(s) left to finish)",
                event="rule_removed", path=path, listener=listener.name, remote=listener.rule.remote,
                live=listener.live(),
            )
            self._retire_when_drained(listener)
        failed = 0
        for endpoint, rule in added:
            listener = self._new_listener(endpoint, rule)
            try:
                listener.setServiceParent(self)
            except CannotListenError as e:
                self.removeService(listener)
                failed += 1
                log.error("{path}:{line}: {error}", path=path, line=rule.line,
                          error=bind_error_message(endpoint, e))
        for listener in updated:
            log.info("updated {listener} -> {remote}", listener=listener.name, remote=listener.rule.remote)
        self.reloads += 1
        log.info(
            "reloaded {path}: {added} added, {removed} removed, {updated} updated, "
            "{unchanged} unchanged, {failed} failed",
            event="reload", path=path, added=len(added) - failed, removed=len(removed), updated=len(updated),
            unchanged=len(current) - len(removed) - len(updated), failed=failed,
        )

    def _retire_when_drained(self, listener: ListenerService) -> None:
        # No deadline here: a removed rule's connections end naturally (the
        # idle timeout still applies); shutdown drains whatever is left.
        listener.drain(float("inf")).addCallback(lambda _: self.retiring.discard(listener))

    def _stamp(self):
        return file_stamp(self.settings.config)

    def _check_config_changed(self) -> None:
        if self._stamp() != self._config_stamp:
            self.reload()

    # Plumbing

    def _report(self) -> None:
        self.reporter.report(self.listeners())

    def _start_timer(self, function, interval: float) -> None:
        timer = LoopingCall(function)
        timer.clock = self.reactor
        timer.start(interval, now=False)
        self._timers.append(timer)


def _endpoints(rules: list[Rule]):
    for rule in rules:
        for endpoint in rule.listen:
            yield endpoint, rule


def _what_relays(rule: Rule) -> tuple:
    """The parts of a rule that change what a listener does (not its line)."""
    return (rule.remote_host, rule.remote_port, rule.options)
