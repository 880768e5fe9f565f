# -*- test-case-name: tests.test_tap -*-
"""``twistd tunnelpass``: command-line options and the service tree per mode.

Every option may also come from the environment as ``TUNNELPASS_<OPTION>``
(``--max-conns`` -> ``TUNNELPASS_MAX_CONNS``); a flag on the command line
wins over the environment.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from tunnelpass import __version__
from tunnelpass.logs import make_observer
from tunnelpass.rules import Limits, RulesError
from tunnelpass.settings import (
    LOG_FORMATS,
    LOG_LEVELS,
    parse_choice,
    parse_count,
    parse_duration,
    parse_positive_duration,
)

MODES = ("server", "client", "forward", "master")
AVAILABLE_MODES = ("forward",)
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
}


class Options(usage.Options):
    synopsis = "--mode MODE [options]"
    longdesc = (
        "tunnelpass: secure, fast TCP/UDP tunnel and port forwarder.\n\n"
        "Modes: forward (static port forwarder from a rules file); server, client "
        "and master are not available yet.  Every option can also be set in the "
        "environment as TUNNELPASS_<OPTION> (e.g. TUNNELPASS_MAX_CONNS=200); "
        "flags win over the environment.  Durations: 500ms, 30s, 10m, 1h."
    )
    optParameters = [
        ["mode", "m", None, "What to run: " + " | ".join(MODES) + " (required)."],
        ["config", "c", "etc/tunnelpass.conf", "forward: the rules file ('listen | host | port [| options]')."],
        ["max-conns", None, "1000", "forward: concurrent TCP connections per rule."],
        ["max-sessions", None, "1000", "forward: concurrent UDP sessions (client addresses) per rule."],
        ["connect-timeout", None, "5s", "forward: time allowed to connect to the remote."],
        ["idle", None, "10m", "forward: close a TCP connection idle this long in both directions (0 = never)."],
        ["udp-idle", None, "60s", "forward: expire a UDP session idle this long."],
        ["reload-interval", None, "0", "forward: re-read the rules file when it changes, checked this often (0 = off; SIGHUP always reloads)."],
        ["zero-copy", None, "on", "forward: relay plain TCP with splice(2) in the kernel (Linux); off = copy through Python."],
        ["shutdown-timeout", None, "5s", "Time live connections get to finish on SIGTERM/SIGINT before they are aborted."],
        ["report-interval", None, "60s", "Emit a structured stats event this often (0 = only at shutdown)."],
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
        if mode is None:
            raise usage.UsageError(
                "choose a mode with --mode " + "|".join(MODES) + " (only 'forward' is available yet)"
            )
        if mode not in AVAILABLE_MODES:
            raise usage.UsageError(
                f"--mode {mode} is not available yet in tunnelpass {__version__}; "
                f"available: {', '.join(AVAILABLE_MODES)}"
            )

    def parseArgs(self, *args):
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r} (options start with --)")


def environment_arguments(environ) -> list[str]:
    """``TUNNELPASS_*`` variables as command-line arguments (placed first, so
    flags given on the command line override them)."""
    known = {ENV_PREFIX + name.upper().replace("-", "_"): name for name in _PARSERS}
    arguments = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        name = known.get(variable)
        if name is None:
            raise usage.UsageError(
                f"unknown environment variable {variable}; known: {', '.join(sorted(known))}"
            )
        value = environ[variable]
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


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from tunnelpass.forward import ForwardSettings, ForwarderService, load_rules

    root = TunnelpassService(make_observer(options["log"], options["log-format"]))
    settings = ForwardSettings(
        config=options["config"],
        defaults=Limits(
            max_conns=options["max-conns"],
            connect_timeout=options["connect-timeout"],
            idle=options["idle"],
            udp_idle=options["udp-idle"],
            max_sessions=options["max-sessions"],
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
    ForwarderService(settings, rules, reactor).setServiceParent(root)
    return root
