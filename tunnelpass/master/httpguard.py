# -*- test-case-name: tests.test_master_http -*-
"""The master API's HTTP/1.1 connections, guarded: deadlines, a body cap
enforced while reading, connection caps, and the loopback ``Host`` check.

twisted.web's own idle timeout restarts on every byte received, so a client
that sends one header byte per second holds a connection for ever
(slowloris).  Here each phase of a request has one deadline that bytes do
not extend: the request line and headers within 10 s of the connection (or
of the first byte of a keep-alive request), the body within 10 s of the
headers; an idle keep-alive connection is closed after 60 s.  No deadline
runs while the application answers (an event stream is endless).

The body is capped at 64 KiB while it arrives: a ``Content-Length`` over
the cap is refused before any of it is read, and a chunked body is counted
as it is decoded, so the cap bounds memory, not just what the handler sees.

HTTP/1.1 only: the factory's protocol is a plain channel, so TLS with ALPN
never switches to HTTP/2, whose framing these guards do not cover.
"""

from __future__ import annotations

import ipaddress
import json

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server

HEADER_DEADLINE = 10.0
BODY_DEADLINE = 10.0
IDLE_DEADLINE = 60.0
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 256
MAX_PER_SOURCE = 128

SECURITY_HEADERS = ((b"X-Content-Type-Options", b"nosniff"),
                    (b"Cache-Control", b"no-store"))


def host_is_loopback(host: bytes | None) -> bool:
    """Whether a ``Host`` header names loopback: ``localhost``,
    ``127.x.x.x`` or ``[::1]``, with any port.  A missing or malformed
    header does not (a DNS-rebinding page always sends the attacker's
    name; a real local client sends a loopback one)."""
    if not host:
        return False
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeError:
        return False
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return False
        name, rest = text[1:end], text[end + 1:]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return False
    else:
        name, sep, port = text.partition(":")
        if sep and not _is_port(port):
            return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_port(port: str) -> bool:
    return port.isdigit() and 0 < len(port) <= 5


def error_response(status: int, reason: bytes, message: str) -> bytes:
    """A complete ``Connection: close`` JSON error response, for refusals
    made below twisted.web's request handling."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    head = [b"HTTP/1.1 %d %s" % (status, reason),
            b"Content-Type: application/json; charset=utf-8",
            b"Content-Length: %d" % len(body), b"Connection: close"]
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with phase deadlines and the body cap (see the
    module docstring).  ``callLater`` is the factory's clock."""

    log = Logger()
    max_body = MAX_BODY
    header_deadline, body_deadline, idle_deadline = (
        HEADER_DEADLINE, BODY_DEADLINE, IDLE_DEADLINE)

    def __init__(self):
        super().__init__()
        self._phase = "headers"
        self._timer = None
        self._body_bytes = 0
        self._refused = False
        self.on_lost = None

    def _arm(self, phase: str, seconds: float | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._phase = phase
        if seconds is not None:
            self._timer = self.callLater(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        self.log.debug("API connection from {peer} cut: {phase} deadline",
                       peer=str(self.transport.getPeer()), phase=phase)
        self.transport.abortConnection()

    def connectionMade(self):
        super().connectionMade()
        self._arm("headers", self.header_deadline)

    def dataReceived(self, data):
        if self._refused:
            return
        if self._phase == "idle":
            self._arm("headers", self.header_deadline)
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self):
        length = self.length
        if length is not None and length > self.max_body:
            self._refuse_body()
            return
        self._body_bytes = 0
        decoder = self._transferDecoder
        if decoder is not None:
            inner = decoder.dataCallback
            decoder.dataCallback = lambda data: self._count_body(inner, data)
        super().allHeadersReceived()
        if self.length != 0 and not self._refused:
            self._arm("body", self.body_deadline)

    def _count_body(self, inner, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self._refuse_body()
            return
        inner(data)

    def _refuse_body(self) -> None:
        """413 and close, reading nothing more of this connection."""
        self._refused = True
        self._arm("refused", None)
        self.transport.write(error_response(413, b"Payload Too Large",
                                            "Request body too large"))
        self.transport.loseConnection()

    def allContentReceived(self):
        if self._refused:
            return
        self._arm("handling", None)
        super().allContentReceived()

    def requestDone(self, request):
        # Armed before the base class replays pipelined bytes, which may
        # start (and even finish) the next request's phases.
        if self.persistent:
            self._arm("idle", self.idle_deadline)
        super().requestDone(request)

    def connectionLost(self, reason):
        self._arm("closed", None)
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(self)


class _Refused(Protocol):
    """A connection over a cap: closed as soon as it is made, unanswered."""

    def connectionMade(self):
        self.transport.abortConnection()


class GuardedSite(server.Site):
    """A ``Site`` whose connections are :class:`GuardedChannel` s, at most
    *max_connections* at once and *max_per_source* per source address (a
    connection over a cap is closed unanswered).  *clock* drives every
    deadline."""

    protocol = GuardedChannel
    log_ = Logger()

    def __init__(self, resource, clock, max_connections: int = MAX_CONNECTIONS,
                 max_per_source: int = MAX_PER_SOURCE):
        super().__init__(resource, timeout=None, reactor=clock)
        self.displayTracebacks = False
        self.max_connections, self.max_per_source = max_connections, max_per_source
        self.live = 0
        self.per_source: dict[str, int] = {}

    def buildProtocol(self, addr):
        source = getattr(addr, "host", "")
        if (self.live >= self.max_connections
                or self.per_source.get(source, 0) >= self.max_per_source):
            self.log_.debug("API connection from {source} refused: connection cap",
                            source=source)
            # Not None: a TLS wrapper around this factory would wrap None too
            # and leave the socket open.  This one closes it at once.
            return _Refused()
        channel = super().buildProtocol(addr)
        self.live += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        channel.on_lost = lambda _channel: self._lost(source)
        return channel

    def _lost(self, source: str) -> None:
        self.live -= 1
        left = self.per_source.get(source, 1) - 1
        if left > 0:
            self.per_source[source] = left
        else:
            self.per_source.pop(source, None)

    def startFactory(self):
        """Nothing to open: there is no access log (see :meth:`log`), so
        neither its file nor its once-a-second date timer."""

    def stopFactory(self):
        pass

    def log(self, request):
        """No access log line per request: the API's own events are logged
        where they happen (keys rejected, instances changed)."""
