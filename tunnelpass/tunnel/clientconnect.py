# -*- test-case-name: tests.test_reachlog -*-
"""How the client reaches the server: the endpoint, TLS, retry delays.

Each attempt to open the control connection is rebuilt from scratch: the
server's name is resolved again (``HostnameEndpoint``) and TLS is whatever
level is current (:mod:`tunnelpass.tunnel.tlslevel`: the user's, or what the last
attempt learnt).  The TLS client side is made once per level (pinned or
channel-bound for 1, chain and name verified for 2); SIGHUP re-reads
``--ca``.  Retry delays are capped and jittered
(:func:`tunnelpass.tunnel.reachlog.retry_delay`), zero once when a "TLS required"
answer says which level to try next.

A mixin of :class:`tunnelpass.tunnel.client.TunnelClient`, kept apart so the
service module holds the session, the listeners and the stop.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.tunnel.reachlog import RETRY_CAP, SLOW_RETRY_CAP, retry_delay
from tunnelpass.tunnel.reachlog import connect_failure as reachlog_connect_failure
from tunnelpass.config.settings import format_address
from tunnelpass.carriers.tlshalf import HalfCloseTLSEndpoint

if TYPE_CHECKING:
    from tunnelpass.tunnel.client import ClientSettings, TunnelClient


@implementer(IStreamClientEndpoint)
class _ServerEndpoint:
    """The server's address with whatever TLS level is current, rebuilt per
    attempt (the level can change after a "TLS required" answer, and
    ``HostnameEndpoint`` re-resolves the name every time)."""

    def __init__(self, client: "TunnelClient"):
        self.client = client

    def connect(self, factory):
        self.client.session_event("connect")
        d = self.client.endpoint().connect(factory)
        d.addErrback(self.client.connect_failed)
        return d

    def __repr__(self) -> str:
        s = self.client.settings
        return f"tunnelpass server {format_address(s.server_host, s.server_port)}"


def known_level(settings: ClientSettings) -> int | None:
    """The server's TLS level as the user told it, if they did."""
    if settings.tls is not None:
        return settings.tls
    if settings.pin:
        return 1
    if settings.ca or settings.sni:
        return 2
    return None


class ServerConnecting:
    """The connecting part of :class:`~tunnelpass.tunnel.client.TunnelClient`."""

    def endpoint(self):
        s = self.settings
        endpoint = HostnameEndpoint(self.reactor, s.server_host, s.server_port, timeout=s.connect_timeout)
        level = self.levels.current
        if level == 0:
            return endpoint
        return HalfCloseTLSEndpoint(self._creator(level), endpoint)

    def _creator(self, level: int):
        """The TLS client side for *level*: pinned (or channel-bound) for 1,
        chain and name verified for 2; made once per level."""
        creator = self._creators.get(level)
        if creator is None:
            s = self.settings
            if level == 1:
                creator = tlsmod.PinnedClientCreator(s.pin)
            else:
                creator = tlsmod.verified_client_creator(s.sni or s.server_host, s.ca)
            self._creators[level] = creator
        return creator

    def reload(self) -> None:
        """SIGHUP: re-read ``--ca`` (new connections use it; a bad file keeps
        the current one).  Nothing else a client uses is read from a file."""
        s = self.settings
        if not s.ca:
            self.log.info("SIGHUP: nothing to reload (no --ca; key, pin and addresses are read at start only)")
            return
        try:
            creator = tlsmod.verified_client_creator(s.sni or s.server_host, s.ca)
        except tlsmod.CertificateError as e:
            self.log.error("SIGHUP: --ca reload failed, keeping the current CA certificates: {error}", error=str(e))
            return
        self._creators[2] = creator
        self.log.info("SIGHUP: reloaded --ca {path}", path=s.ca, event="ca_reloaded")

    #: Set by the client: the last attempt's key was refused or its source
    #: turned away (back off up to SLOW_RETRY_CAP), and a pause to keep
    #: before the next attempt (after another client took the session).
    _slow = False
    _pause_next = 0.0

    def _retry_delay(self, attempts: int) -> float:
        if self._retry_now:
            delay = 0.0
        else:
            delay = retry_delay(attempts + self.failures, cap=SLOW_RETRY_CAP if self._slow else RETRY_CAP)
        if self._pause_next:
            delay = max(delay, self._pause_next * (0.8 + 0.4 * random.random()))
            self._pause_next = 0.0
        self._retry_now = False
        self.session_event("back_off")
        self.reach.retrying(delay)
        return delay

    def connect_failed(self, failure):
        """A TCP connect to the server failed (ClientService retries)."""
        self.session_event("fail")
        self.reach.failed(reachlog_connect_failure(failure.value))
        return failure
