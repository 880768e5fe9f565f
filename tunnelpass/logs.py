# -*- test-case-name: tests.test_logs -*-
"""Log observers for ``--log LEVEL`` and ``--log-format text|json``.

tunnelpass logs to standard output (run ``twistd -n`` or ``twist``; under
systemd the journal collects it).  JSON output is one object per line, with
every structured field of the event (stats counters included).
"""

from __future__ import annotations

import re
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)

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
            text = formatEvent(event)
            if _UDP_SOCKET_CHATTER.match(text) or text.startswith("tunnelpass-udp-session starting on"):
                return PredicateResult.no
        return PredicateResult.maybe

    return predicate


def make_observer(level: str = "info", fmt: str = "text", stream=None):
    """An observer writing events at *level* or above to *stream* (stdout)."""
    stream = stream or sys.stdout
    threshold = LEVELS[level]
    if fmt == "json":
        base = jsonFileLogObserver(stream, recordSeparator="")
    else:
        base = textFileLogObserver(stream)
    return FilteringLogObserver(
        base,
        [LogLevelFilterPredicate(defaultLogLevel=threshold), _demote_socket_chatter(threshold)],
    )


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
