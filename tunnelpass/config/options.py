# -*- test-case-name: tests.test_tap -*-
"""tunnelpass's command line: the options, their checks, the environment.

:class:`Options` is what ``twistd tunnelpass`` parses (twistd finds it as
``tunnelpass.tap.Options``, which re-exports it).  Every value is converted
and checked here (``_PARSERS``; cross-option rules per mode; one URL
argument, whose values win over flags; a ``--token``), so a service is built
from values that are already valid.

Every option may also come from the environment as ``TUNNELPASS_<OPTION>``
(``--max-conns`` -> ``TUNNELPASS_MAX_CONNS``), and some as NodePass's
``NP_*`` names (:mod:`tunnelpass.config.envoptions`); a flag on the command line
wins over the environment.
"""

from __future__ import annotations

import os

from twisted.python import usage

from tunnelpass import __version__
from tunnelpass.ops.metrics import parse_metrics_address
from tunnelpass.config.settings import (
    LOG_FORMATS,
    LOG_LEVELS,
    is_ip_literal,
    parse_carrier_type,
    parse_choice,
    parse_count,
    parse_duration,
    parse_host,
    parse_log_level,
    parse_positive_duration,
    _show,
)
from tunnelpass.relay.dialsource import check_target, parse_dial
from tunnelpass.relay.proxyaccept import parse_networks
from tunnelpass.relay.block import parse_block
from tunnelpass.relay.ratelimit import parse_rate
from tunnelpass.config.envoptions import environment_arguments
from tunnelpass.config.optionerrors import USAGE_ERROR, keyless_client_message, traffic_forwarder_hint, usage_line
from tunnelpass.carriers.tls import parse_pin
from tunnelpass.relay.hostaddrs import parse_public_address
from tunnelpass.config.masterurl import DEFAULT_API, DEFAULT_PREFIX, parse_api_address, parse_master_url, parse_origins, parse_prefix
from tunnelpass.config.urls import KEY_RULE, check_key, parse_address, parse_targets, parse_token, parse_url

MODES = ("server", "client", "forward", "master")
AVAILABLE_MODES = MODES

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
    "heartbeat": lambda v: _heartbeat(v),
    "zero-copy": lambda v: parse_choice(v, ("on", "off")) == "on",
    "log": parse_log_level,
    "log-format": lambda v: parse_choice(v, LOG_FORMATS),
    # server and client
    "tunnel": lambda v: parse_address(v, "--tunnel"),
    "target": lambda v: parse_targets(v),
    "key": lambda v: check_key(v, weak_ok=True),  # strength: Options._check_key_strength
    "token": parse_token,
    "public-address": lambda v: parse_public_address(v),
    "flow": lambda v: parse_choice(v, FLOW_CHOICES),
    "tls": lambda v: int(parse_choice(v, ("0", "1", "2"))),
    "type": parse_carrier_type,
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
    "dial": parse_dial,
    "dns": parse_duration,
    "lbs": lambda v: int(parse_choice(v, ("0", "1", "2"))),
    "fallback-interval": parse_positive_duration,
    "block": parse_block,
    # master
    "api": parse_api_address,
    "api-prefix": parse_prefix,
    "workers": lambda v: parse_count(v, 1, 64),
    "cors": parse_origins,
}

#: Options only one side of a tunnel reads (refused on the other side).
_CLIENT_ONLY = ("ca", "pin", "sni", "token")
_SERVER_ONLY = ("cert", "private-key", "state-dir", "public-address")
#: Options only --mode master reads.
_MASTER_ONLY = ("api", "api-prefix", "workers", "cors")
#: Options --mode master refuses (it runs tunnels only as instances, from their URLs).
_NOT_MASTER = ("tunnel", "target", "key", "token", "ca", "pin", "sni", "public-address", "type")
_TUNNEL_ONLY = ("tunnel", "target", "key", "token", "cert", "private-key", "state-dir", "ca", "pin", "sni",
                "public-address", "type")

FLOW_CHOICES = ("auto", "receive", "send", "local", "tunnel")


def _heartbeat(text: str) -> float:
    """The server's ping interval: 100 ms to 10 min (what the handshake carries)."""
    seconds = parse_duration(text)
    if not 0.1 <= seconds <= 600:
        raise ValueError(f"{text!r} is out of range: 100ms to 10m")
    return seconds

#: Flags (no value) that the environment may set: TUNNELPASS_WEAK_KEY=1.
_FLAGS = ("weak-key",)



class Options(usage.Options):
    synopsis = "--mode MODE [options]"
    longdesc = (
        "tunnelpass: secure, fast TCP/UDP tunnel and port forwarder.\n\n"
        "Modes: server and client (a tunnel; also as a NodePass-style URL "
        "argument, e.g. 'server://KEY@0.0.0.0:10101/0.0.0.0:8080?tls=1'), forward "
        "(static port forwarder from a rules file) and master (a NodePass-compatible REST API that runs "
        "tunnel instances, e.g. 'master://127.0.0.1:9090/api').  "
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
        ["reload-interval", None, "0", "forward: re-read the rules file when it changes, checked this often (0 = off; SIGHUP always reloads).  "
                                       "master: online backup of the state database this often (0 = the default, 1h)."],
        ["zero-copy", None, "on", "relay with native engines: splice(2) for plain TCP, OpenSSL on the socket for TLS "
         "(Linux); off = every byte through Twisted's transports."],
        ["shutdown-timeout", None, "5s", "Time live connections get to finish on SIGTERM/SIGINT before they are aborted."],
        ["report-interval", None, None, "Log a stats/health line (event stats / health) this often (0 = only at shutdown; "
                                        "default 60s).  master: how often instances report their status and counters "
                                        "(default 5s; one silent for three intervals is marked error)."],
        ["heartbeat", None, "5s", "server: ping the client this often on the control channel (100ms..10m); a side silent for three heartbeats is dropped."],
        ["tunnel", None, None, "server: address to listen on for clients; client: the server's address (flow local: the local listen address)."],
        ["target", None, None, "server: where users connect (receive flow) or what to dial (send flow); client: what to dial (receive) or where to listen (send)."],
        ["key", "k", None, f"Tunnel key: {KEY_RULE} (else refused, see --weak-key).  A server without one generates a strong key and logs a client command and --token."],
        ["token", None, None, "client: a tp1. token from the server's log (server address, key, certificate pin); an explicit --tunnel overrides its address."],
        ["public-address", None, None, "server: HOST[:PORT] the logged token and client command carry (URL public=; default: the bound address, or for a wildcard bind the host's first non-loopback address; PORT defaults to the tunnel port)."],
        ["flow", None, "auto", "server: auto | receive | send; client: auto (follow the server) | receive | send (refuse a server that runs the other flow) | local (forward --tunnel to --target, no server)."],
        ["tls", None, None, "server: 0 plain (default), 1 self-signed (pinned/channel-bound), 2 --cert/--private-key verified by clients; client: the server's level, if known (default: --pin means 1, --ca/--sni 2, a token says; else learned from the server, never fixed by what an unauthenticated peer says)."],
        ["type", None, None, "server: the carrier, NodePass's pool type: 0 a pool of TCP connections, one per "
                             "tunnelled connection (default), 3 HTTP/2 multiplexed (streams in a few long-lived "
                             "connections); 1 (QUIC) and 2 (WebSocket) are not available yet (URL type=).  "
                             "client: follows the server's, or with --type insists on it (refuses another)."],
        ["cert", None, None, "server --tls 2: certificate chain (PEM)."],
        ["private-key", None, None, "server --tls 2: private key (PEM) of --cert."],
        ["state-dir", None, None, "server --tls 1: keep the self-signed certificate here so its fingerprint survives restarts.  "
                                  "master: its database, backup, API certificate and instances' state "
                                  "(default: $STATE_DIRECTORY, else ~/.local/state/tunnelpass/master)."],
        ["api", None, None, f"master: HOST:PORT the REST API listens on (default {DEFAULT_API}, loopback only; "
                            ":PORT = every IPv4 interface; URL master://HOST:PORT)."],
        ["api-prefix", None, None, f"master: path prefix of the API, which lives under PREFIX/v1 (default "
                                   f"{DEFAULT_PREFIX}; URL master://HOST:PORT/PREFIX)."],
        ["workers", None, None, "master: worker processes that host the instances (default: one per core)."],
        ["cors", None, None, "master: ORIGIN[,ORIGIN] of web pages allowed to call the API from a browser "
                             "(e.g. https://dash.example.com); off by default, never *."],
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
        ["dial", None, "auto", "Source IP for dials of --target / forward remotes (TCP and UDP), an address of this host of the target's family; auto = the kernel's choice (URL dial=)."],
        ["lbs", None, "0", "server/client: how a target group (--target A,B,...) is dialled: 0 round robin with failover, 1 lowest TCP-connect latency (probed every --report-interval), 2 primary/backup (the first target while it works; URL lbs=)."],
        ["fallback-interval", None, "5m", "--lbs 2: time on a backup target before the primary is tried again (NodePass's NP_FALLBACK_INTERVAL)."],
        ["block", None, "0", "Refuse user connections that start as 1 SOCKS4/5, 2 HTTP, 3 TLS (digits combine: 123; 0 = none), judged on their first bytes where users connect (URL block=)."],
        ["dns", None, "5m", "Cache target name lookups this long, per instance (0 = look up on every connection; IP literals never are; URL dns=)."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on PORT (127.0.0.1), HOST:PORT, [IPV6]:PORT, :PORT (all IPv4 interfaces) or a Twisted endpoint (e.g. tcp:9100:interface=127.0.0.1)."],
        ["accept-proxy", None, "", "forward (TCP listeners) and server (public listener): CIDR[,CIDR] of trusted proxies whose PROXY v1/v2 header is read; other sources are refused."],
        ["log", None, "info", "Log level: " + " | ".join(LOG_LEVELS) + " (debug also traces each connection: "
                              "accept, pool claim, dial, close)."],
        ["log-format", None, "text", "Log format: text | json (one flat JSON object per line: time, level, logger, "
                                     "message, event and the event's fields).  Goes where twistd logs: stdout "
                                     "with -n, --logfile, --syslog."],
    ]

    #: Where ``TUNNELPASS_*``/``NP_*`` values come from (None: ``os.environ``).
    environ: dict | None = None

    def opt_version(self):
        """Print the tunnelpass version and exit."""
        print(f"tunnelpass {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None):
        """Parse, check and convert every option.

        Under twistd (which sets ``parent``) a usage error ends the process
        here, with one line and a hint, and exit status 2: twistd itself
        would print the whole ``--help`` text first and exit 1.  Called
        directly (tests, tools), it raises :class:`usage.UsageError`."""
        import sys

        argv = list(sys.argv[1:] if options is None else options)
        try:
            hint = traffic_forwarder_hint(argv)
            if hint:
                raise usage.UsageError(hint)
            environ = os.environ if self.environ is None else self.environ
            super().parseOptions(environment_arguments(environ, _PARSERS, _FLAGS) + self._url_last(argv))
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            print(usage_line(e), file=sys.stderr)
            raise SystemExit(USAGE_ERROR) from None

    def _url_last(self, argv: list[str]) -> list[str]:
        """Options may follow the URL (``tunnelpass 'server://...' --log
        debug``, as NodePass users write them): getopt stops at the first
        argument that is not an option, so the URL moves to the end."""
        takes_value = {"--" + name[:-1] for name in self.longOpt if name.endswith("=")}
        takes_value |= {"-" + letter for letter, after in zip(self.shortOpt, self.shortOpt[1:] + " ")
                        if letter != ":" and after == ":"}
        options, urls, value_next = [], [], False
        for index, arg in enumerate(argv):
            if arg == "--":
                options += argv[index:]
                break
            if value_next:
                options.append(arg)
                value_next = False
            elif not arg.startswith("-") and "://" in arg:
                urls.append(arg)
            else:
                options.append(arg)
                value_next = arg in takes_value
        return options + urls

    def postOptions(self):
        for name, parser in _PARSERS.items():
            raw = self[name]
            if raw is None:
                continue
            try:
                self[name] = parser(raw)
            except ValueError as e:
                text = str(e)  # a parser that names the option itself (--type 1 (QUIC) ...) keeps its words
                raise usage.UsageError(text if text.startswith(f"--{name} ") else f"--{name}: {text}") from None
        mode = self["mode"]
        if mode is None:
            raise usage.UsageError(
                "choose a mode with --mode " + "|".join(AVAILABLE_MODES) + " (or give a server:// or client:// URL)"
            )
        if mode not in AVAILABLE_MODES:
            raise usage.UsageError(
                f"--mode {mode} is not available yet in tunnelpass {__version__}; "
                f"available: {', '.join(AVAILABLE_MODES)}"
            )
        self._check_options_of_other_modes(mode)
        if mode in ("server", "client"):
            self._check_tunnel_options(mode)
        if self["report-interval"] is None:
            self["report-interval"] = 5.0 if mode == "master" else 60.0
        if mode == "master":
            self._check_master_options()

    def _check_master_options(self) -> None:
        """The master's API: TLS like a tunnel server's, defaults filled in."""
        if self["tls"] == 2 and not (self["cert"] and self["private-key"]):
            raise usage.UsageError("master --tls 2 needs --cert and --private-key (URL crt= and key=)")
        if self["tls"] != 2 and (self["cert"] or self["private-key"]):
            raise usage.UsageError("--cert/--private-key (URL crt=/key=) are for --tls 2")
        if self["report-interval"] == 0:
            raise usage.UsageError("master --report-interval must be more than 0: instances report their "
                                   "status and counters this often")
        self["api"] = self["api"] or DEFAULT_API
        self["api-prefix"] = self["api-prefix"] or DEFAULT_PREFIX

    def _check_options_of_other_modes(self, mode: str) -> None:
        """An option that only another mode, flow or TLS level reads is
        refused, not ignored: an operator who passes ``--ca`` expects it to
        be read, and a missing file must then stop the process."""
        if mode != "master":
            for name in _MASTER_ONLY:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} is for --mode master, not --mode {mode}")
        if mode == "master":
            for name in _NOT_MASTER:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} is for --mode server/client; the master runs tunnels as "
                                           "instances created through its API")
            return
        if mode == "forward":
            for name in _TUNNEL_ONLY:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} is for --mode server/client, not --mode forward")
            return
        other = "client" if mode == "server" else "server"
        for name in _CLIENT_ONLY if mode == "server" else _SERVER_ONLY:
            if self[name] is not None:
                raise usage.UsageError(f"--{name} is for --mode {other}, not --mode {mode}")
        if mode == "client" and self["flow"] == "local":
            for name in ("ca", "pin", "sni"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} checks a server's certificate; a --flow local client "
                                           "talks to no server")
            if self["type"] is not None:
                raise usage.UsageError("--type is the carrier to a server; a --flow local client talks to no server")
        if mode == "server" and self["state-dir"] is not None and self["tls"] != 1:
            raise usage.UsageError(f"--state-dir keeps a --tls 1 server's certificate; this server runs "
                                   f"--tls {self['tls'] or 0}")

    def _check_tunnel_options(self, mode: str) -> None:
        token = self["token"]
        self.dial_reason = "from --tunnel"
        if self["public-address"] is not None and mode != "server":
            raise usage.UsageError("--public-address is for --mode server (what its logged token carries)")
        if token is not None:
            if mode != "client":
                raise usage.UsageError("--token is for --mode client")
            if self["key"] is not None:
                raise usage.UsageError("give --token or --key, not both")
            token_address = parse_address(f"{_bracket(token['host'])}:{token['port']}")
            if self["tunnel"] is None or self["tunnel"] == token_address:
                self["tunnel"], self.dial_reason = token_address, "from the token"
            else:
                # An explicit --tunnel (flag, environment or URL) wins: the
                # token's address is what the server guessed about itself.
                self.dial_reason = f"--tunnel overrides the token's {token_address}"
                if token["tls"] == 2 and self["sni"] is None and not is_ip_literal(token["host"]):
                    self["sni"] = token["host"]  # the certificate still names the token's host
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
            raise usage.UsageError(keyless_client_message(self["tunnel"], self["target"], self.url))
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
        for host, port in split_targets(self["target"]):
            try:
                check_target(self["dial"], host, port)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
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
            raise usage.UsageError(f"unexpected argument {_show(args[1])} (give one URL at most)")
        if args:
            if "://" not in args[0]:
                raise usage.UsageError(f"unexpected argument {_show(args[0])} (options start with --; "
                                       "a URL looks like server://KEY@HOST:PORT/HOST:PORT)")
            self.url = args[0]
            try:
                master = args[0][:9].lower() == "master://"
                url_options = parse_master_url(args[0]) if master else parse_url(args[0])
            except ValueError as e:
                text = str(e)
                raise usage.UsageError(text if text.startswith("URL") else f"URL: {text}") from None
            for name, value in url_options.items():
                self[name] = value


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def split_targets(text: str) -> list[tuple[str, int]]:
    return [split_address(part) for part in text.split(",")]


def parse_tunnel_url(url: str) -> Options:
    """A ``server://`` or ``client://`` URL checked and converted exactly as
    the command line does it, the environment left out (the master's
    instances are their URL, nothing else).  Raises
    :class:`usage.UsageError` with the command line's message."""
    if not isinstance(url, str) or not url.lower().startswith(("server://", "client://")):
        raise usage.UsageError("the URL must start with server:// or client://")
    options = Options()
    options.environ = {}
    options.parseOptions([url])
    return options
