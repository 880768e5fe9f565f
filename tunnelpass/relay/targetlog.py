# -*- test-case-name: tests.test_targetlog -*-
"""Why a target could not be reached, said at the default log level.

A relay whose target refuses, times out or does not resolve hangs up on
the user, who sees only an empty reply; the operator must see why in the
log without a line per failed connection.  :func:`why_unreachable` renders
a dial failure as short text ("connection refused", "timed out", "name not
resolved", ...: never an object's repr), and :class:`TargetWarnings` logs
one warning per target at once, then at most one per
:data:`TARGET_LOG_INTERVAL` seconds per target, with the number of
failures in between.  Sans-IO apart from the logger: the clock is injected.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelpass.ops.logs import Throttle
from tunnelpass.config.settings import format_address

#: Seconds between two warnings about the same target.
TARGET_LOG_INTERVAL = 10.0
#: Targets whose throttles are kept (least recently failed dropped first);
#: targets come from the configuration, so this is never reached in practice.
MAX_TRACKED_TARGETS = 1024

_BY_TYPE = (
    (error.ConnectionRefusedError, "connection refused"),
    (error.DNSLookupError, "name not resolved"),
    (error.TCPTimedOutError, "timed out"),
    (error.TimeoutError, "timed out"),
    (defer.TimeoutError, "timed out"),
    (error.NoRouteError, "network unreachable"),  # Twisted's name for ENETUNREACH
)
_BY_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.EADDRNOTAVAIL: "cannot assign the source address",
    errno.EACCES: "permission denied",
}


def why_unreachable(reason) -> str:
    """*reason* (a Failure or an exception from a dial) as short text."""
    value = reason.value if isinstance(reason, Failure) else reason
    for kind, text in _BY_TYPE:
        if isinstance(value, kind):
            return text
    number = getattr(value, "osError", None)
    if number is None:
        number = getattr(value, "errno", None)
    if isinstance(number, int):
        if number in _BY_ERRNO:
            return _BY_ERRNO[number]
        name = errno.errorcode.get(number)
        return f"{os.strerror(number)} ({name})" if name else os.strerror(number)
    text = str(value).strip()
    return text or type(value).__name__


class TargetWarnings:
    """Throttled ``connect_failed`` warnings, one throttle per target."""

    log = Logger(namespace="tunnelpass.targets")

    def __init__(self, clock, interval: float = TARGET_LOG_INTERVAL, limit: int = MAX_TRACKED_TARGETS):
        self.clock, self.interval, self.limit = clock, interval, limit
        self._throttles: OrderedDict[str, Throttle] = OrderedDict()

    def failed(self, listener: str, host: str, port: int, reason, protocol: str = "tcp") -> bool:
        """A dial of *host*:*port* for *listener* failed; returns whether a
        warning went out (the first at once, then one per interval)."""
        target = format_address(host, port)
        throttle = self._throttles.pop(target, None) or Throttle(self.clock, self.interval)
        self._throttles[target] = throttle  # most recent last
        while len(self._throttles) > self.limit:
            self._throttles.popitem(last=False)
        if not throttle.ready():
            return False
        why = reason if isinstance(reason, str) else why_unreachable(reason)
        count = throttle.take_count()
        self.log.warn(
            "{listener}: cannot reach target {target} ({protocol}): {reason}"
            " ({count} failures since the last warning)" if count > 1 else
            "{listener}: cannot reach target {target} ({protocol}): {reason}",
            event="connect_failed", listener=listener, target=target, protocol=protocol, reason=why,
            count=count, interval=self.interval,
        )
        return True
