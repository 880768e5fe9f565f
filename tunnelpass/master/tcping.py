# -*- test-case-name: tests.test_master_info -*-
"""``GET /tcping?target=HOST:PORT``: how long a TCP connect to *target*
takes from the master's host (NodePass's operator tool).

It may aim at any host: the route is behind the API key, and the operator
who holds the key can run tunnels to anywhere already.  What is bounded is
the cost: at most :data:`MAX_AT_ONCE` probes at a time (more: 429), each
one deadline of :data:`TIMEOUT` seconds over name lookup and connect, and
the connection is aborted as soon as it is made (no byte is sent).
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol

from tunnelpass.config.settings import parse_host
from tunnelpass.master.errors import ApiError

MAX_AT_ONCE = 10
TIMEOUT = 5.0
MAX_TARGET = 262  # a 253-character name, ':' and a port, with room for brackets


def parse_target(target) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ApiError 400 otherwise."""
    if not isinstance(target, str) or not target:
        raise ApiError(400, "Target address required")
    if len(target) > MAX_TARGET:
        raise ApiError(400, "Invalid target: longer than a host name and a port")
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
        if not sep or ":" not in host:
            raise ApiError(400, "Invalid target: expected [IPV6]:PORT")
    else:
        host, sep, port = target.rpartition(":")
        if not sep or ":" in host:
            raise ApiError(400, "Invalid target: expected HOST:PORT (IPv6 in brackets)")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ApiError(400, "Invalid target: the port must be 1-65535")
    try:
        host = parse_host(host, "target host")
    except ValueError as e:
        raise ApiError(400, f"Invalid target: {e}") from None
    if target.startswith("[") and ":" not in host:
        raise ApiError(400, "Invalid target: only IPv6 addresses go in brackets")
    return host, int(port)


class _Probe(Protocol):
    def connectionMade(self):
        self.transport.abortConnection()


class TCPing:
    """Connect-latency probes with a cap on how many run at once."""

    def __init__(self, reactor, limit: int = MAX_AT_ONCE, timeout: float = TIMEOUT):
        self.reactor, self.limit, self.timeout = reactor, limit, timeout
        self.running = 0

    def ping(self, target) -> Deferred:
        """-> ``{"target", "connected", "latency" (whole ms), "error"}``;
        fails with ApiError 400 (bad target) or 429 (too many at once)."""
        try:
            host, port = parse_target(target)
        except ApiError as e:
            return fail(e)
        if self.running >= self.limit:
            return fail(ApiError(429, f"Too many tcping probes at once (at most {self.limit}); retry later"))
        self.running += 1
        started = self.reactor.seconds()
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        attempt = endpoint.connect(Factory.forProtocol(_Probe))
        attempt.addTimeout(self.timeout, self.reactor)

        def connected(_):
            latency = int(max(0.0, self.reactor.seconds() - started) * 1000)
            return {"target": target, "connected": True, "latency": latency, "error": None}

        def failed(failure):
            if failure.check(DeferredTimeout, CancelledError, error.ConnectingCancelledError, error.TimeoutError):
                text = f"timeout: no connection within {self.timeout:g} s"
            else:
                text = failure.getErrorMessage() or failure.type.__name__
            return {"target": target, "connected": False, "latency": 0, "error": text}

        def done(result):
            self.running -= 1
            return result

        attempt.addCallbacks(connected, failed)
        attempt.addBoth(done)
        return attempt

