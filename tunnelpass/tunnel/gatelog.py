# -*- test-case-name: tests.test_gatelog -*-
"""Clients that do not speak TLS to a TLS server, said at the default level.

A server with ``--tls 1`` or ``2`` expects a TLS ClientHello as the first
bytes of every tunnel connection.  Plain bytes there get a one-line answer
("TLS required", which a client that was not told the level learns from)
and the connection is closed.  One such attempt is normal: a client
started without the token or ``--tls`` makes it once and then uses TLS.
A source that comes back with plain bytes within :data:`REPEAT_WINDOW`
seconds did not learn (it was told ``--tls 0``, or is an old or foreign
client): that is what the operator must see, as one warning naming the
address, the level and the fix.

The peer is unauthenticated, so nothing it does can flood the log: one
warning per :data:`LOG_INTERVAL` seconds in all (the attempts in between
are counted), and a bounded table of recent sources
(:data:`MAX_SOURCES`, least recent dropped first).  Every attempt is
counted by the server in ``handshake_failures{reason="no_tls"}``.
"""

from __future__ import annotations

from collections import OrderedDict

from OpenSSL import SSL
from twisted.logger import Logger

from tunnelpass.ops.logs import Throttle
from tunnelpass.config.settings import format_address

#: Seconds within which a second plain attempt from one source means it
#: does not learn (a client's reconnect delay is well below this).
REPEAT_WINDOW = 120.0
#: Seconds between two warnings (for all sources together).
LOG_INTERVAL = 10.0
#: Sources remembered for :data:`REPEAT_WINDOW`.
MAX_SOURCES = 1024


class PlainClients:
    """Decides when plain bytes at a TLS server are worth a warning."""

    log = Logger(namespace="tunnelpass.server")

    def __init__(self, clock, tls_level: int, interval: float = LOG_INTERVAL,
                 window: float = REPEAT_WINDOW, limit: int = MAX_SOURCES):
        self.clock, self.tls_level = clock, tls_level
        self.window, self.limit = window, limit
        self._seen: OrderedDict[str, float] = OrderedDict()  # host -> its last plain attempt
        self._throttle = Throttle(clock, interval)

    def learned(self, host: str) -> None:
        """A session from *host* started (over TLS): its plain attempt was
        a client learning the level, so the next one from there is not a
        repeat (two clients on one host, each learning once)."""
        self._seen.pop(host, None)

    def plain(self, host: str, port: int) -> bool:
        """A connection from *host*:*port* sent plain bytes where a
        ClientHello belongs; returns whether a warning went out."""
        now = self.clock.seconds()
        last = self._seen.pop(host, None)
        self._seen[host] = now
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        if last is None or now - last > self.window:
            self.log.debug("plain connection from {address} to a TLS server: told that TLS is required "
                           "(a client that was not told the level learns it so)",
                           address=format_address(host, port))
            return False
        if not self._throttle.ready():
            return False
        count = self._throttle.take_count()
        self.log.warn(
            "client at {address} is not speaking TLS (the server runs --tls {tls_level}; start the client "
            "with the token / --tls {tls_level})" + (" ({count} such connections since the last warning)"
                                                      if count > 1 else ""),
            event="client_not_tls", address=format_address(host, port), tls_level=self.tls_level, count=count,
        )
        return True


def tls_failed(reason) -> bool:
    """Whether a connection ended (*reason*, a Failure or None) because its
    TLS handshake or a TLS record failed."""
    return reason is not None and reason.check(SSL.Error) is not None


def tls_error_text(reason) -> str:
    """OpenSSL's reason for a TLS failure as text ("tlsv1 alert unknown
    ca", "wrong version number"), never a repr."""
    details = reason.value.args[0] if reason.value.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(reason.value) or "TLS error"
