# -*- test-case-name: tests.test_tap -*-
"""``twistd tunnelpass``: command-line options and the service tree per mode.

Every option may also come from the environment as ``TUNNELPASS_<OPTION>``
(``--max-conns`` -> ``TUNNELPASS_MAX_CONNS``); a flag on the command line
wins over the environment.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from tunnelpass import __version__
from tunnelpass.logs import make_observer
from tunnelpass.metrics import parse_metrics_address
from tunnelpass.rules import Limits, RulesError
from tunnelpass.settings import (
    LOG_FORMATS,
    LOG_LEVELS,
    parse_choice,
    parse_count,
    parse_duration,
    parse_host,
    parse_positive_duration,
)
from tunnelpass.proxyaccept import parse_networks
from tunnelpass.ratelimit import RateLimiter, parse_rate
from tunnelpass.tls import parse_pin
from tunnelpass.urls import KEY_ADVICE, KEY_RULE, check_key, key_weakness, parse_address, parse_token, parse_url

MODES = ("server", "client", "forward", "master")
AVAILABLE_MODES = ("server", "client", "forward")
ENV_PREFIX = "TUNNELPASS_"

_count = lambda v: parse_count(v, 1, 1_000_000)  # noqa: E731
_duration_or_off = parse_duration  # 0 means "off" where documented

#: option -> (parser, settings attribute); parsers raise ValueError.
_PARSERS = {
    "mode": lambda v: parse_choice(v, MODES),
    "config": str,
    "max-conns": _count,
    "max-sessions": _count,
    "connect-timeout": parse_positive_duration,
    "idle": parse_duration,
    "udp-idle": parse_positive_duration,
    "reload-interval": _duration_or_off,
    "shutdown-timeout": parse_duration,
    "report-interval": _duration_or_off,
    "zero-copy": lambda v: parse_choice(v, ("on", "off")) == "on",
    "log": lambda v: parse_choice(v, LOG_LEVELS),
    "log-format": lambda v: parse_choice(v, LOG_FORMATS),
    # server and client
    "tunnel": lambda v: parse_address(v, "--tunnel"),
    "target": lambda v: parse_targets(v),
    "key": lambda v: check_key(v, weak_ok=True),  # strength: Options._check_key_strength
    "token": parse_token,
    "flow": lambda v: parse_choice(v, FLOW_CHOICES),
    "tls": lambda v: int(parse_choice(v, ("0", "1", "2"))),
    "cert": str,
    "private-key": str,
    "state-dir": str,
    "min-pool": lambda v: parse_count(v, 1, 65535),
    "max-pool": lambda v: parse_count(v, 1, 65535),
    "pool-timeout": parse_positive_duration,
    "handshake-timeout": parse_positive_duration,
    "pin": parse_pin,
    "ca": str,
    "sni": lambda v: parse_host(v, "--sni"),
    "read": parse_duration,
    "slot": _count,
    "no-tcp": lambda v: parse_choice(v, ("0", "1")) == "1",
    "no-udp": lambda v: parse_choice(v, ("0", "1")) == "1",
    "udp-buffer": lambda v: parse_count(v, 1, 65535),
    "proxy-protocol": lambda v: parse_choice(v, ("off", "v1", "v2")),
    "accept-proxy": parse_networks,
    "metrics": parse_metrics_address,
    "rate": parse_rate,
}

FLOW_CHOICES = ("auto", "receive", "send", "local", "tunnel")

#: Flags (no value) that the environment may set: TUNNELPASS_WEAK_KEY=1.
_FLAG_VALUES = {"0": False, "1": True, "false": False, "true": True}
_FLAGS = ("weak-key",)

#: NodePass environment variables -> options (NodePass users keep their setup).
NP_ALIASES = {
    "NP_SEMAPHORE_LIMIT": "slot",
    "NP_POOL_GET_TIMEOUT": "pool-timeout",
    "NP_REPORT_INTERVAL": "report-interval",
    "NP_SHUTDOWN_TIMEOUT": "shutdown-timeout",
    "NP_RELOAD_INTERVAL": "reload-interval",
    "NP_TCP_DIAL_TIMEOUT": "connect-timeout",
    "NP_HANDSHAKE_TIMEOUT": "handshake-timeout",
}


class Options(usage.Options):
    synopsis = "--mode MODE [options]"
    longdesc = (
        "tunnelpass: secure, fast TCP/UDP tunnel and port forwarder.\n\n"
        "Modes: server and client (a tunnel; also as a NodePass-style URL "
        "argument, e.g. 'server://KEY@0.0.0.0:10101/0.0.0.0:8080?tls=1'), forward "
        "(static port forwarder from a rules file); master is not available yet.  "
        "Every option can also be set in the environment as TUNNELPASS_<OPTION> "
        "(e.g. TUNNELPASS_MAX_CONNS=200) and some as NodePass's NP_* names; flags win "
        "over the environment, a URL's values win over flags.  Durations: 500ms, 30s, 10m, 1h."
    )
    optFlags = [
        ["weak-key", None, "server/client: accept a --key that fails the strength rule (8+ different characters, "
                           "an estimated 64+ bits), with a warning at startup; never one under 16 characters "
                           "(URL weakkey=1, TUNNELPASS_WEAK_KEY=1)."],
    ]
    optParameters = [
        ["mode", "m", None, "What to run: " + " | ".join(MODES) + " (required)."],
        ["config", "c", "etc/tunnelpass.conf", "forward: the rules file ('listen | host | port [| options]')."],
        ["max-conns", None, "1000", "forward: concurrent TCP connections per rule."],
        ["max-sessions", None, "1000", "forward: concurrent UDP sessions (client addresses) per rule; server/client: in all."],
        ["connect-timeout", None, "5s", "forward: time allowed to connect to the remote."],
        ["idle", None, "10m", "forward: close a TCP connection idle this long in both directions (0 = never)."],
        ["udp-idle", None, "60s", "Expire a UDP session (one per client address) idle this long."],
        ["reload-interval", None, "0", "forward: re-read the rules file when it changes, checked this often (0 = off; SIGHUP always reloads)."],
        ["zero-copy", None, "on", "forward: relay plain TCP with splice(2) in the kernel (Linux); off = copy through Python."],
        ["shutdown-timeout", None, "5s", "Time live connections get to finish on SIGTERM/SIGINT before they are aborted."],
        ["report-interval", None, None, "Emit a structured stats/health event this often (0 = only at shutdown; default 60s for forward, 5s for server/client, which is also the heartbeat)."],
        ["tunnel", None, None, "server: address to listen on for clients; client: the server's address (flow local: the local listen address)."],
        ["target", None, None, "server: where users connect (receive flow) or what to dial (send flow); client: what to dial (receive) or where to listen (send)."],
        ["key", "k", None, f"Tunnel key: {KEY_RULE} (else refused, see --weak-key).  A server without one generates a strong key and logs a client command and --token."],
        ["token", None, None, "client: a tp1. token from the server's log (server address, key, certificate pin)."],
        ["flow", None, "auto", "server: auto | receive | send; client: auto (follow the server) | receive | send (refuse a server that runs the other flow) | local (forward --tunnel to --target, no server)."],
        ["tls", None, None, "server: 0 plain (default), 1 self-signed (pinned/channel-bound), 2 --cert/--private-key verified by clients; client: the server's level, if known (default: --pin means 1, --ca/--sni 2, a token says; else learned from the server, never fixed by what an unauthenticated peer says)."],
        ["cert", None, None, "server --tls 2: certificate chain (PEM)."],
        ["private-key", None, None, "server --tls 2: private key (PEM) of --cert."],
        ["state-dir", None, None, "server --tls 1: keep the self-signed certificate here so its fingerprint survives restarts."],
        ["min-pool", None, "64", "client: idle pool connections to keep at least."],
        ["max-pool", None, "1024", "server: idle pool connections a client may keep; client: its own upper bound."],
        ["pool-timeout", None, "5s", "How long a user connection waits for an idle pool connection before it is refused."],
        ["handshake-timeout", None, "5s", "One deadline over TLS and the tunnel handshake of each connection."],
        ["pin", None, None, "client: sha256:HEX fingerprint the tls=1 server's certificate must have."],
        ["ca", None, None, "client: CA certificates (PEM) that verify a tls=2 server (default: system roots)."],
        ["sni", None, None, "client: name to verify a tls=2 server's certificate against (default: the --tunnel host)."],
        ["read", None, "10m", "server/client: close a tunnelled connection idle this long (0 = never)."],
        ["slot", None, "65536", "server/client: concurrent tunnelled connections."],
        ["no-tcp", None, "0", "server/client: 1 = do not carry TCP (URL notcp=1)."],
        ["no-udp", None, "0", "server/client: 1 = do not carry UDP (URL noudp=1)."],
        ["udp-buffer", None, "65535", "server/client: largest UDP datagram carried, in bytes; larger ones are dropped and counted, never truncated."],
        ["proxy-protocol", None, "off", "server/client: off | v1 | v2: the side that dials --target first sends it a PROXY header with the user's address (URL proxy=1 is v1)."],
        ["rate", None, "0", "Bandwidth limit for the whole instance in Mbit/s, both directions together (0 = none)."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on PORT (127.0.0.1), HOST:PORT, [IPV6]:PORT, :PORT (all IPv4 interfaces) or a Twisted endpoint (e.g. tcp:9100:interface=127.0.0.1)."],
        ["accept-proxy", None, "", "forward (TCP listeners) and server (public listener): CIDR[,CIDR] of trusted proxies whose PROXY v1/v2 header is read; other sources are refused."],
        ["log", None, "info", "Log level: " + " | ".join(LOG_LEVELS) + "."],
        ["log-format", None, "text", "Log format: text | json (one JSON object per line)."],
    ]

    def opt_version(self):
        """Print the tunnelpass version and exit."""
        print(f"tunnelpass {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None):
        import sys

        argv = list(sys.argv[1:] if options is None else options)
        hint = traffic_forwarder_hint(argv)
        if hint:
            raise usage.UsageError(hint)
        super().parseOptions(environment_arguments(os.environ) + argv)

    def postOptions(self):
        for name, parser in _PARSERS.items():
            raw = self[name]
            if raw is None:
                continue
            try:
                self[name] = parser(raw)
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        mode = self["mode"]
        if self["report-interval"] is None:
            self["report-interval"] = 60.0 if mode == "forward" else 5.0
        if mode is None:
            raise usage.UsageError(
                "choose a mode with --mode " + "|".join(AVAILABLE_MODES) + " (or give a server:// or client:// URL)"
            )
        if mode not in AVAILABLE_MODES:
            raise usage.UsageError(
                f"--mode {mode} is not available yet in tunnelpass {__version__}; "
                f"available: {', '.join(AVAILABLE_MODES)}"
            )
        if mode in ("server", "client"):
            self._check_tunnel_options(mode)

    def _check_tunnel_options(self, mode: str) -> None:
        token = self["token"]
        if token is not None:
            if mode != "client":
                raise usage.UsageError("--token is for --mode client")
            if self["key"] is not None:
                raise usage.UsageError("give --token or --key, not both")
            self["tunnel"] = parse_address(f"{_bracket(token['host'])}:{token['port']}")
            self["key"] = token["key"]
            if token["pin"] is not None and self["pin"] is None:
                self["pin"] = token["pin"]
            if token["tls"] is not None and self["tls"] is None:
                self["tls"] = token["tls"]
        if self["tunnel"] is None or self["target"] is None:
            raise usage.UsageError(f"--mode {mode} needs --tunnel HOST:PORT and --target HOST:PORT (or a URL)")
        flows = ("auto", "receive", "send") if mode == "server" else ("auto", "receive", "send", "local", "tunnel")
        if "," in self["target"] and mode == "server" and self["flow"] == "receive":
            raise usage.UsageError("a target group (several --target addresses) is dialled, never listened on: "
                                   "use --flow send (or auto)")
        if self["flow"] not in flows:
            raise usage.UsageError(f"--flow {self['flow']} is not a {mode} flow; use {' | '.join(flows)}")
        if mode == "client" and self["key"] is None and self["flow"] != "local":
            raise usage.UsageError("--mode client needs --key (or --token)")
        if mode == "server" and self["tls"] == 2 and not (self["cert"] and self["private-key"]):
            raise usage.UsageError("--tls 2 needs --cert and --private-key")
        if mode == "server" and self["tls"] != 2 and (self["cert"] or self["private-key"]):
            raise usage.UsageError("--cert/--private-key are for --tls 2")
        if mode == "client" and self["accept-proxy"]:
            raise usage.UsageError("--accept-proxy is for --mode server and --mode forward")
        if self["no-tcp"] and self["no-udp"]:
            raise usage.UsageError("--no-tcp 1 and --no-udp 1 leave nothing to tunnel: drop one of them")
        if mode == "client" and self["tls"] is not None and (
                (self["pin"] is not None and self["tls"] != 1) or ((self["ca"] or self["sni"]) and self["tls"] != 2)):
            raise usage.UsageError(f"--tls {self['tls']} contradicts --pin (tls=1) or --ca/--sni (tls=2)")
        if mode == "client" and self["pin"] is not None and (self["ca"] or self["sni"]):
            raise usage.UsageError("--pin is for tls=1 servers, --ca/--sni for tls=2: give one kind")
        self._check_key_strength()

    def _check_key_strength(self) -> None:
        """The one strength check, on the key finally chosen (--key, the
        environment, a URL or a --token), once --weak-key is known."""
        self["weak-key"] = self["weak-key"] in (True, 1, "1")  # the flag, or a URL's weakkey=0/1
        if self["key"] is not None:
            try:
                check_key(self["key"], weak_ok=self["weak-key"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None

    url: str | None = None

    def parseArgs(self, *args):
        if len(args) > 1:
            raise usage.UsageError(f"unexpected argument {args[1]!r} (give one URL at most)")
        if args:
            if "://" not in args[0]:
                raise usage.UsageError(f"unexpected argument {args[0]!r} (options start with --; "
                                       "a URL looks like server://KEY@HOST:PORT/HOST:PORT)")
            try:
                url_options = parse_url(args[0])
            except ValueError as e:
                raise usage.UsageError(f"URL: {e}") from None
            for name, value in url_options.items():
                self[name] = value


#: traffic-forwarder's flags (Go's flag package takes them with one dash or
#: two) -> the line that tells its users what to write here instead.  Caught
#: before getopt, which reads ``-conf`` as ``-c onf`` (--config onf) and
#: ``-max-conns`` as ``-m ax-conns`` (--mode ax-conns).
TRAFFIC_FORWARDER_HINTS = {
    "-conf": "-conf is traffic-forwarder's flag: use --config FILE "
             "(the same 'local_port | remote_host | remote_port' file works)",
    "-timeout": "-timeout is traffic-forwarder's flag: use --connect-timeout DURATION (time to reach the remote) "
                "and --idle DURATION (close connections quiet that long)",
    "--timeout": "--timeout is traffic-forwarder's flag: use --connect-timeout DURATION (time to reach the remote) "
                 "and --idle DURATION (close connections quiet that long)",
    "-max-conns": "-max-conns is traffic-forwarder's flag: use --max-conns N (concurrent connections per rule)",
}


def traffic_forwarder_hint(argv) -> str | None:
    """The hint for the first traffic-forwarder flag in *argv* (``-conf FILE``
    or ``-conf=FILE``), if any; arguments after ``--`` are not options."""
    for argument in argv:
        if argument == "--":
            break
        hint = TRAFFIC_FORWARDER_HINTS.get(argument.split("=", 1)[0])
        if hint:
            return hint
    return None


def environment_arguments(environ) -> list[str]:
    """``TUNNELPASS_*`` variables as command-line arguments (placed first, so
    flags given on the command line override them)."""
    known = {ENV_PREFIX + name.upper().replace("-", "_"): name for name in (*_PARSERS, *_FLAGS)}
    arguments = []
    for variable in sorted(environ):
        if variable in NP_ALIASES:
            name = NP_ALIASES[variable]
            value = environ[variable]
            try:
                _PARSERS[name](value)
            except ValueError as e:
                raise usage.UsageError(f"environment variable {variable} (--{name}): {e}") from None
            arguments.append(f"--{name}={value}")
            continue
        if not variable.startswith(ENV_PREFIX):
            continue
        name = known.get(variable)
        if name is None:
            raise usage.UsageError(
                f"unknown environment variable {variable}; known: {', '.join(sorted(known))}"
            )
        value = environ[variable]
        if name in _FLAGS:
            if value.lower() not in _FLAG_VALUES:
                raise usage.UsageError(f"environment variable {variable}: use 1 or 0")
            arguments += [f"--{name}"] if _FLAG_VALUES[value.lower()] else []
            continue
        try:
            _PARSERS[name](value)
        except ValueError as e:
            raise usage.UsageError(f"environment variable {variable}: {e}") from None
        arguments.append(f"--{name}={value}")
    return arguments


class TunnelpassService(MultiService):
    """The root service; it also gives twistd tunnelpass's log observer."""

    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:  # a twistd Application
            set_component(ILogObserver, self.observer)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


MAX_TARGETS = 64


def parse_targets(text: str) -> str:
    """``HOST:PORT[,HOST:PORT...]`` (a target group) -> normalized text."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_TARGETS:
        raise ValueError(f"at most {MAX_TARGETS} targets in a group")
    addresses = [parse_address(part, "--target") for part in parts]
    if len(set(addresses)) != len(addresses):
        raise ValueError("a target is listed twice")
    return ",".join(addresses)


def split_targets(text: str) -> list[tuple[str, int]]:
    return [split_address(part) for part in text.split(",")]


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    root = TunnelpassService(make_observer(options["log"], options["log-format"]))
    if options["mode"] in ("server", "client"):
        make = _server_service if options["mode"] == "server" else _client_service
        service = make(options, reactor)
        service.setServiceParent(root)
        _metrics(options, service, reactor, root)
        _weak_key_warning(options, root)
        return root
    from tunnelpass.forward import ForwardSettings, ForwarderService, load_rules

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
        ),
        reload_interval=options["reload-interval"],
        shutdown_timeout=options["shutdown-timeout"],
        report_interval=options["report-interval"],
        zero_copy=options["zero-copy"],
    )
    try:
        rules = load_rules(settings.config)
    except RulesError as e:
        raise SystemExit(f"tunnelpass: invalid rules file: {e}") from None
    forwarder = ForwarderService(settings, rules, reactor)
    forwarder.setServiceParent(root)
    _metrics(options, forwarder, reactor, root)
    return root


def _metrics(options, service, reactor, root) -> None:
    if options["metrics"]:
        from tunnelpass.metrics import MetricsService

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


def _tunnel_limits(options, reactor) -> Limits:
    return Limits(max_conns=options["slot"], connect_timeout=options["connect-timeout"], idle=options["read"],
                  limiter=_limiter(options, reactor), proxy=options["proxy-protocol"],
                  udp_idle=options["udp-idle"], max_sessions=options["max-sessions"])


def _carried(options) -> dict:
    """What the tunnel carries (--no-tcp / --no-udp) and the datagram size."""
    return {"tcp": not options["no-tcp"], "udp": not options["no-udp"], "udp_buffer": options["udp-buffer"]}


def _server_service(options, reactor):
    from tunnelpass.server import ServerSettings, TunnelServer
    from tunnelpass.urls import generate_key

    tunnel_host, tunnel_port = split_address(options["tunnel"])
    targets = split_targets(options["target"])
    target_host, target_port = targets[0]
    key = options["key"]
    settings = ServerSettings(
        tunnel_host=tunnel_host, tunnel_port=tunnel_port, target_host=target_host, target_port=target_port,
        key=key or generate_key(), key_generated=key is None, flow=options["flow"], tls=options["tls"] or 0,
        cert=options["cert"], private_key=options["private-key"], state_dir=options["state-dir"],
        max_pool=options["max-pool"], pool_timeout=options["pool-timeout"],
        handshake_timeout=options["handshake-timeout"], heartbeat=options["report-interval"] or 5.0,
        report_interval=options["report-interval"], reload_interval=options["reload-interval"] or 3600.0,
        shutdown_timeout=options["shutdown-timeout"], limits=_tunnel_limits(options, reactor),
        zero_copy=options["zero-copy"], accept_proxy=options["accept-proxy"], targets=tuple(targets),
        **_carried(options),
    )
    return TunnelServer(settings, reactor)


def _client_service(options, reactor):
    from tunnelpass.client import ClientSettings, TunnelClient

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
    )
    return TunnelClient(settings, reactor)
