# -*- test-case-name: tests.test_tap -*-
"""``twistd tunnelpass``: options in, the service tree per mode out.

twistd's ``ServiceMaker("tunnelpass", "tunnelpass.tap", ...)`` takes
``Options`` and ``makeService`` from here.  The options themselves (parsing,
checks, the environment) are :mod:`tunnelpass.config.options`, re-exported; this
module turns checked options into settings and services: the root service
(tunnelpass's log observer, start failures as one line, the process's
signals), the server, the client or the forwarder, the metrics endpoint
and startup warnings.

The root is the only place that installs signal handlers or ends the
process: services raise :class:`~tunnelpass.ops.starterror.StartupError` and
offer ``reload()``; SIGHUP reaches every child that has one.
"""

from __future__ import annotations

import signal

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, Logger

from tunnelpass.ops import connlog
from tunnelpass.ops.logs import make_observer, twistd_options
from tunnelpass.config.options import Options, split_address, split_targets
from tunnelpass.config.limits import Limits
from tunnelpass.config.rules import MAX_FILE_BYTES as RULES_FILE_BYTES, RulesError
from tunnelpass.relay.dialsource import Dialer, check_target
from tunnelpass.relay.ratelimit import RateLimiter
from tunnelpass.ops.signals import Signals
from tunnelpass.ops.startup import Launcher, StartupError, StartupWatch, check_files, guard_start, read_file
from tunnelpass.config.urls import KEY_ADVICE, key_weakness

__all__ = ["Options", "makeService"]  # what twistd's ServiceMaker("tunnelpass", "tunnelpass.tap") uses


class TunnelpassService(MultiService):
    """The root service; it also gives twistd tunnelpass's log observer.

    twistd uses an application's ``ILogObserver`` component instead of the
    observer it would build from ``--logfile``/``--syslog``/``-n``, so the
    observer given here is built from those same options
    (:func:`tunnelpass.ops.logs.make_observer`): the destination stays
    twistd's, the level filter and the format are tunnelpass's.

    It owns the process's signals (:mod:`tunnelpass.ops.signals`): SIGTERM and
    SIGINT stop the reactor for an orderly exit 0 (installed before the
    children bind anything, and again once the reactor runs, since the
    reactor installs its own at start), SIGHUP calls ``reload()`` on each
    child that has one, and a stop is bounded by *shutdown_timeout* plus a
    margin.  *signals*: injected in tests."""

    log = Logger(namespace="tunnelpass")

    def __init__(self, observer, reactor=None, launcher=None, shutdown_timeout: float = 5.0, signals=None):
        super().__init__()
        self.observer = observer
        self.reactor = reactor
        self.launcher = launcher or Launcher()
        self.shutdown_timeout = shutdown_timeout
        self.signals = signals if signals is not None else (Signals(reactor) if reactor is not None else None)

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:  # a twistd Application
            set_component(ILogObserver, self.observer)

    # A failed start ends the process with one line and status 1
    # (tunnelpass.ops.startup): twistd would print a traceback, or, for a
    # failure once the reactor runs, log it and keep running.

    #
    # ``twist`` (unlike twistd) never calls privilegedStartService, where
    # the services bind their ports: startService does it first then.

    _privileged = False

    def privilegedStartService(self):
        self._privileged = True
        if self.signals is not None:
            # Before anything is bound: a SIGTERM while starting up (before
            # the reactor runs) must still mean an orderly exit 0.
            self.signals.install_stop()
        guard_start(super().privilegedStartService, "privilegedStartService", self.launcher)

    def startService(self):
        if not self._privileged:
            self.privilegedStartService()
        if self.signals is not None:
            # Ours go back on once the reactor runs (it installs its own as
            # it starts), before any child's "running" line.
            self.reactor.callWhenRunning(self.signals.install_stop)
            self.signals.install(signal.SIGHUP, self.reload)
        guard_start(super().startService, "startService", self.launcher)
        if self.reactor is not None:
            StartupWatch(self.reactor).start()  # after the children's callWhenRunning

    def reload(self) -> None:
        """SIGHUP: every child that can reload does (each logs what it did)."""
        for child in list(self):
            reload = getattr(child, "reload", None)
            if reload is not None:
                try:
                    reload()
                except Exception:
                    self.log.failure("reload failed in {service}", service=getattr(child, "name", None) or child)

    def stopService(self):
        if self.signals is not None:
            self.signals.bound_stop(self.shutdown_timeout)
        d = super().stopService()
        if self.signals is not None:
            d.addBoth(lambda result: (self.signals.restore(), result)[1])
        return d


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        check_files(options)  # before twistd logs: the one line goes to stderr as it is
    except StartupError as e:
        raise SystemExit(f"tunnelpass: {e}") from None
    connlog.TRACING.enabled = options["log"] == "debug"
    twistd = twistd_options(options)
    root = TunnelpassService(make_observer(options["log"], options["log-format"], twistd=twistd), reactor,
                             Launcher(twistd), shutdown_timeout=options["shutdown-timeout"])
    if options["mode"] == "master":
        return _master_service(options, reactor, root)
    if options["mode"] in ("server", "client"):
        service = tunnel_service(options, reactor)
        service.setServiceParent(root)
        _metrics(options, service, reactor, root)
        _weak_key_warning(options, root)
        return root
    from tunnelpass.forward.service import ForwardSettings, ForwarderService, load_rules

    settings = ForwardSettings(
        config=options["config"],
        defaults=Limits(
            max_conns=options["max-conns"],
            connect_timeout=options["connect-timeout"],
            idle=options["idle"],
            udp_idle=options["udp-idle"],
            max_sessions=options["max-sessions"],
            accept_proxy=options["accept-proxy"],
            limiter=_limiter(options, reactor),
            dialer=_dialer(options, reactor),
            block=options["block"],
        ),
        reload_interval=options["reload-interval"],
        shutdown_timeout=options["shutdown-timeout"],
        report_interval=options["report-interval"],
        zero_copy=options["zero-copy"],
    )
    try:
        read_file("--config", settings.config, limit=RULES_FILE_BYTES)  # missing, unreadable, not a file
        rules = load_rules(settings.config)
    except StartupError as e:
        raise SystemExit(f"tunnelpass: {e}") from None
    except RulesError as e:
        raise SystemExit(f"tunnelpass: --config {e}") from None
    for rule in rules:
        try:
            check_target(options["dial"], rule.remote_host, rule.remote_port)
        except ValueError as e:
            raise SystemExit(f"tunnelpass: {settings.config}:{rule.line}: {e}") from None
    forwarder = ForwarderService(settings, rules, reactor)
    forwarder.setServiceParent(root)
    _metrics(options, forwarder, reactor, root)
    return root


def _master_service(options, reactor, root):
    """``--mode master``: the API, its store and worker processes."""
    from tunnelpass.master.service import MasterService
    from tunnelpass.master.settings import MasterSettings, default_state_dir, default_workers

    host, port = split_address(options["api"])
    settings = MasterSettings(
        api_host=host, api_port=port, prefix=options["api-prefix"], tls=options["tls"] or 0,
        crt=options["cert"], key=options["private-key"], state_dir=options["state-dir"] or default_state_dir(),
        workers=options["workers"] or default_workers(), cors=options["cors"] or (),
        report_interval=options["report-interval"], backup_interval=options["reload-interval"] or 3600.0,
        shutdown_timeout=options["shutdown-timeout"], log=options["log"])
    try:
        if settings.tls == 2:
            from tunnelpass.ops.startup import check_pair
            check_pair(settings.crt, settings.key)
    except StartupError as e:
        raise SystemExit(f"tunnelpass: {e}") from None
    # Stopping drains every instance (--shutdown-timeout) and then reaps the workers.
    root.shutdown_timeout = settings.shutdown_timeout + 10.0
    master = MasterService(settings, reactor)
    master.setServiceParent(root)
    _metrics(options, master, reactor, root)
    return root


def tunnel_service(options, reactor):
    """The tunnel server or client that checked *options* describe (a
    ``--mode server``/``client`` run, or one of the master's instances)."""
    make = _server_service if options["mode"] == "server" else _client_service
    return make(options, reactor)


def _metrics(options, service, reactor, root) -> None:
    if options["metrics"]:
        from tunnelpass.ops.metrics import MetricsService

        MetricsService(options["metrics"], service.metrics, reactor).setServiceParent(root)


class _StartupWarning(Service):
    """Logs one warning when the service tree starts, so that it reaches the
    configured log (text or JSON) next to the other startup lines."""

    log = Logger(namespace="tunnelpass.tap")

    def __init__(self, text: str, **fields):
        self.text, self.fields = text, fields

    def startService(self):
        super().startService()
        self.log.warn(self.text, **self.fields)


def _weak_key_warning(options, root) -> None:
    weakness = options["key"] and options["weak-key"] and key_weakness(options["key"])
    if weakness:
        _StartupWarning("--weak-key: running with a weak tunnel key ({weakness}); whoever records one "
                        "handshake can guess it offline. Better: {advice}", weakness=weakness,
                        advice=KEY_ADVICE, event="weak_key").setServiceParent(root)


def _limiter(options, reactor):
    return RateLimiter(reactor, options["rate"]) if options["rate"] else None


def _dialer(options, reactor) -> Dialer:
    """The instance's one dialer: --dial source, --dns name cache."""
    return Dialer.create(reactor, options["dial"], options["dns"])


def _tunnel_limits(options, reactor) -> Limits:
    return Limits(max_conns=options["slot"], connect_timeout=options["connect-timeout"], idle=options["read"],
                  limiter=_limiter(options, reactor), proxy=options["proxy-protocol"],
                  udp_idle=options["udp-idle"], max_sessions=options["max-sessions"],
                  dialer=_dialer(options, reactor), block=options["block"], lbs=options["lbs"],
                  fallback=options["fallback-interval"])


def _carried(options) -> dict:
    """What the tunnel carries (--no-tcp / --no-udp) and the datagram size."""
    return {"tcp": not options["no-tcp"], "udp": not options["no-udp"], "udp_buffer": options["udp-buffer"]}


def _server_service(options, reactor):
    from tunnelpass.tunnel.server import ServerSettings, TunnelServer
    from tunnelpass.config.urls import generate_key

    tunnel_host, tunnel_port = split_address(options["tunnel"])
    targets = split_targets(options["target"])
    target_host, target_port = targets[0]
    key = options["key"]
    settings = ServerSettings(
        tunnel_host=tunnel_host, tunnel_port=tunnel_port, target_host=target_host, target_port=target_port,
        key=key or generate_key(), key_generated=key is None, flow=options["flow"], tls=options["tls"] or 0,
        cert=options["cert"], private_key=options["private-key"], state_dir=options["state-dir"],
        max_pool=options["max-pool"], pool_timeout=options["pool-timeout"],
        handshake_timeout=options["handshake-timeout"], heartbeat=options["heartbeat"],
        report_interval=options["report-interval"], reload_interval=options["reload-interval"] or 3600.0,
        shutdown_timeout=options["shutdown-timeout"], limits=_tunnel_limits(options, reactor),
        zero_copy=options["zero-copy"], accept_proxy=options["accept-proxy"], targets=tuple(targets),
        public_address=options["public-address"], carrier_type=options["type"] or 0,
        **_carried(options),
    )
    return TunnelServer(settings, reactor)


def _client_service(options, reactor):
    from tunnelpass.tunnel.client import ClientSettings, TunnelClient

    server_host, server_port = split_address(options["tunnel"])
    targets = split_targets(options["target"])
    target_host, target_port = targets[0]
    settings = ClientSettings(
        server_host=server_host, server_port=server_port, target_host=target_host, target_port=target_port,
        key=options["key"] or "", flow=options["flow"], tls=options["tls"], min_pool=options["min-pool"],
        max_pool=options["max-pool"], pin=options["pin"], ca=options["ca"], sni=options["sni"],
        pool_timeout=options["pool-timeout"], handshake_timeout=options["handshake-timeout"],
        connect_timeout=options["connect-timeout"], report_interval=options["report-interval"],
        shutdown_timeout=options["shutdown-timeout"], limits=_tunnel_limits(options, reactor),
        zero_copy=options["zero-copy"], targets=tuple(targets), **_carried(options),
        dial_reason=getattr(options, "dial_reason", "from --tunnel"), carrier_type=options["type"],
    )
    return TunnelClient(settings, reactor)
