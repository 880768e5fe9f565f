# -*- test-case-name: tests.test_logs -*-
"""Log observers for ``--log LEVEL`` and ``--log-format text|json``.

tunnelpass writes where twistd would: standard output with ``-n`` (under
systemd the journal collects it), the file given by twistd's
``--logfile`` (``twistd.log`` for a daemon, rotated by size and on
SIGUSR1, as twistd does), or syslog with ``--syslog`` (``--prefix``).
twistd uses an application's own observer instead of building its own, so
:func:`make_observer` builds the destination from twistd's options and puts
tunnelpass's level filter and format in front of it.  JSON output is one
flat object per line (:mod:`tunnelpass.ops.jsonlog`).
"""

from __future__ import annotations

import re
import signal
import sys

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from tunnelpass.ops.jsonlog import json_line, record

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
}

# twisted.internet.udp announces every socket it opens and closes at info
# level; the UDP relay opens one per client session, which would flood the log.
_UDP_SOCKET_CHATTER = re.compile(r"^(tunnelpass-udp-session \(UDP\) starting on \d+|\(UDP Port \d+ Closed\))$")


def _demote_socket_chatter(level: LogLevel):
    def predicate(event) -> PredicateResult:
        if level > LogLevel.debug and event.get("log_namespace") == "log_legacy":
            message = event.get("message")  # log.msg's arguments: cheaper than formatting the event
            text = " ".join(map(str, message)) if message else formatEvent(event)
            if _UDP_SOCKET_CHATTER.match(text) or text.startswith("tunnelpass-udp-session starting on"):
                return PredicateResult.no
        return PredicateResult.maybe

    return predicate


def make_observer(level: str = "info", fmt: str = "text", stream=None, twistd=None):
    """An observer writing events at *level* or above, as *fmt*, to
    *stream* if given, else where *twistd*'s options (``--logfile``,
    ``--syslog``, ``-n``) say; with neither, to standard output."""
    threshold = LEVELS[level]
    if stream is None and twistd is not None and twistd.get("syslog"):
        base = SyslogObserver(twistd.get("prefix") or "twisted", fmt)
    else:
        stream = stream or log_stream(twistd)
        base = FileLogObserver(stream, json_line) if fmt == "json" else textFileLogObserver(stream)
    return FilteringLogObserver(
        base,
        [LogLevelFilterPredicate(defaultLogLevel=threshold), _demote_socket_chatter(threshold)],
    )


def twistd_options(options):
    """twistd's own options (``--logfile``, ``--syslog``, ``-n`` ...) when
    *options* are a plugin's under ``twistd``, else None (tests, ``twist``,
    which logs through its own ``--log-*`` options)."""
    parent = getattr(options, "parent", None)
    if parent is None or "nodaemon" not in parent or "logfile" not in parent:
        return None
    return parent


def log_stream(twistd):
    """The file twistd would log to (``UnixAppLogger``'s rules): standard
    output with ``-n`` and no ``--logfile`` (or ``--logfile -``), else the
    ``--logfile`` (default ``twistd.log``), rotated on SIGUSR1.  A file
    that cannot be opened, or ``-`` for a daemon, exits with one line."""
    if twistd is None:
        return sys.stdout
    name = twistd.get("logfile") or ""
    if name == "-" or (not name and twistd.get("nodaemon")):
        if not twistd.get("nodaemon"):
            raise SystemExit("tunnelpass: a daemon cannot log to standard output (--logfile -): "
                             "give a file, --syslog, or run with -n")
        return sys.stdout
    name = name or "twistd.log"
    try:
        logfile = LogFile.fromFullPath(name)
    except OSError as e:
        raise SystemExit(f"tunnelpass: --logfile {name}: cannot open it: {e.strerror or e}") from None
    _rotate_on_sigusr1(logfile)
    return logfile


def _rotate_on_sigusr1(logfile: LogFile) -> None:
    """As twistd: SIGUSR1 rotates the log file (unless a handler is set)."""
    if signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return

    def rotate(number, frame):
        from twisted.internet import reactor

        reactor.callFromThread(logfile.rotate)

    signal.signal(signal.SIGUSR1, rotate)


#: syslog priorities by level (twistd's own syslog observer sends
#: everything as INFO, and failures as ALERT).
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}


def one_line(text: str) -> str:
    """*text* with its line breaks and other control characters escaped
    (``\\n``, ``\\x1b``): one syslog record stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SyslogObserver:
    """``--syslog``: each event as one syslog message at its level's
    priority (text: the message, then the traceback's lines; json: the
    object).  syslog adds the time, the *prefix* and the pid."""

    def __init__(self, prefix: str, fmt: str = "text", syslog=None):
        if syslog is None:
            import syslog
        self.syslog, self.fmt = syslog, fmt
        syslog.openlog(prefix, syslog.LOG_PID, syslog.LOG_DAEMON)

    def __call__(self, event) -> None:
        fields = record(event)
        priority = _SYSLOG_PRIORITY.get(fields["level"], 6)
        if self.fmt == "json":
            lines = [json_line(event).rstrip("\n")]
        else:
            # One record per event: a line break inside the message (a
            # peer's words can end up there) must not start a record of its
            # own, which would read as a separate, forged event.
            lines = [f"[{fields['logger']}] {one_line(fields['message'])}"]
            if "traceback" in fields:
                lines += [f"[{fields['logger']}] | {one_line(line)}"
                          for line in fields["traceback"].splitlines() if line]
        for line in lines:
            self.syslog.syslog(priority, line)


class Throttle:
    """Says whether a repeated warning may be logged now: at most once per
    *interval* seconds, counting what was suppressed in between."""

    def __init__(self, clock, interval: float = 10.0):
        self.clock, self.interval = clock, interval
        self._last = None
        self.suppressed = 0

    def ready(self) -> bool:
        now = self.clock.seconds()
        self.suppressed += 1
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False

    def take_count(self) -> int:
        """Occurrences since the last logged one, including it; resets."""
        count, self.suppressed = self.suppressed, 0
        return count
