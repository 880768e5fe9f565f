# -*- test-case-name: tests.e2e.test_mux_e2e -*-
"""The client's multiplexed carrier connections (``--type 3``).

When the session config says the server runs the HTTP/2 carrier, the
client keeps :data:`CARRIER_CONNECTIONS` carrier connections instead of a
pool.  Each is dialled to the address the control connection reached,
with TLS as the session has it (offering ALPN ``h2``), and authenticates
both ways before any HTTP/2 byte:

* the client sends MUX_AUTH: the session id, a counter, a fresh
  connection id and an HMAC under the session key over them and the
  certificate fingerprint it sees (POOL_AUTH's proof, under its own label);
* the server answers MUX_OK: its HMAC over the same fields and the
  fingerprint of the certificate it served, which the client checks.

Then both sides speak HTTP/2 (:class:`~tunnelpass.carriers.muxconn.MuxConnection`).
Two connections rather than one: while one is being replaced (it died, or
its heartbeat stopped) new streams go to the other at once, and a stalled
TCP connection holds up half the streams, not all.  More do not add
throughput here: one reactor thread serves them all (measured in
``bench/``; see the README).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from zope.interface import implementer

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.carriers.keepalive import enable_keepalive
from tunnelpass.carriers.muxconn import MuxConnection
from tunnelpass.carriers.stream import stream_of
from tunnelpass.carriers.switch import SwitchingProtocol
from tunnelpass.carriers.tlshalf import HalfCloseTLSFactory
from tunnelpass.carriers.tlssocket import connect_tls
from tunnelpass.wire.codec import FrameDecoder, ProtocolError, Type
from tunnelpass.wire.handshake import ID, HandshakeError, check_mux_ok, pool_auth_frame

if TYPE_CHECKING:
    from tunnelpass.tunnel.client import TunnelClient

#: Carrier connections a client keeps per session.
CARRIER_CONNECTIONS = 2


@implementer(IHandshakeListener)
class CarrierDial(SwitchingProtocol):
    """One carrier connection of the client until it is authenticated;
    then it hands the connection to a :class:`MuxConnection`."""

    def __init__(self, client: "TunnelClient", session, counter: int):
        self.client, self.session, self.counter = client, session, counter
        self.conn_id = os.urandom(ID)
        self._auth = b""
        self._fingerprint = b""
        self._decoder = FrameDecoder(allowed=frozenset({Type.MUX_OK, Type.ERROR}))
        self.mux: MuxConnection | None = None

    def connectionMade(self) -> None:
        enable_keepalive(self.transport)
        # One deadline over TLS and MUX_OK: a server that accepted and went
        # quiet must not hold a dial (and the count of dials) for good.
        self._deadline = self.client.clock.callLater(self.client.settings.handshake_timeout, self._expired)
        if stream_of(self.transport).secured is None:
            self._authenticate()

    def _expired(self) -> None:
        self.client.log.info("carrier connection: no MUX_OK within {timeout:g} s; dialling another",
                             timeout=self.client.settings.handshake_timeout, event="carrier_timeout")
        self.transport.abortConnection()

    def _stop_deadline(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()

    def handshakeCompleted(self) -> None:
        self._authenticate()

    def _authenticate(self) -> None:
        if self.session is not self.client.session:
            self.transport.loseConnection()  # dialled for a session that has ended
            return
        self._fingerprint = tlsmod.peer_fingerprint(self.transport)
        self._auth = pool_auth_frame(self.session, self.counter, self.conn_id, self._fingerprint, Type.MUX_AUTH)
        self.transport.write(self._auth)

    def header_received(self, data: bytes) -> None:
        if not self._auth:
            self.transport.abortConnection()  # the server spoke first
            return
        try:
            frames = self._decoder.feed(data, max_frames=1)
            if not frames:
                return
            check_mux_ok(self.session, self._auth, self._fingerprint, frames[0])
        except (ProtocolError, HandshakeError) as e:
            self.client.log.warn("carrier connection refused: {why}", why=str(e), event="carrier_refused")
            self.transport.abortConnection()
            return
        client = self.client
        self._stop_deadline()
        if self.session is not client.session:
            self.transport.loseConnection()
            return
        opener = client.flow == "send"
        self.mux = MuxConnection(opener, None if opener else client.acceptor, client.clock,
                                 self.session.config.heartbeat_ms / 1000, on_lost=client.carrier_lost,
                                 name=f"carrier {self.conn_id.hex()[:8]}")
        self.switch_to(self.mux, self._decoder.take_rest())
        client.carrier_up(self.mux, self.session)

    def header_lost(self, reason) -> None:
        self._stop_deadline()
        self.client.carrier_failed(reason, self.session)


class _CarrierFactory(ClientFactory):
    noisy = False

    def __init__(self, client, session, counter):
        self.args = (client, session, counter)

    def buildProtocol(self, addr):
        return CarrierDial(*self.args)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.args[0].carrier_failed(reason, self.args[1])

    def clientConnectionLost(self, connector, reason) -> None:
        connector.transport = None  # see tunnelpass.tunnel.clientpool._PoolConnectionFactory


class CarrierKeeping:
    """The carrier part of :class:`~tunnelpass.tunnel.client.TunnelClient`:
    keep :data:`CARRIER_CONNECTIONS` up while the session lasts, replace
    one that ends, retire them all when the session ends (their streams
    finish; no new ones)."""

    carriers_dialing = 0  # dials for the current session not yet up or failed
    _dialing_for = None  # the session they are for

    def fill_carriers(self) -> None:
        if self.session is None:
            return
        if self._dialing_for is not self.session:
            self._dialing_for, self.carriers_dialing = self.session, 0  # an earlier session's do not count
        missing = CARRIER_CONNECTIONS - len(self.carriers) - self.carriers_dialing
        for _ in range(max(0, missing)):
            self._dial_carrier()

    def _dial_carrier(self) -> None:
        self.counter += 1
        self.carriers_dialing += 1
        factory = _CarrierFactory(self, self.session, self.counter)
        host, port = self.server_address
        level = self.session_level
        if level and isinstance(self.reactor, PosixReactorBase):
            connect_tls(self.reactor, host, port, factory, tlsmod.ALPNCreator(self._creator(level)),
                        timeout=self.settings.connect_timeout)
            return
        if level:  # a reactor without sockets (in-memory tests): Twisted's TLS
            factory = HalfCloseTLSFactory(tlsmod.ALPNCreator(self._creator(level)), True, factory)
        self.reactor.connectTCP(host, port, factory, timeout=self.settings.connect_timeout)

    def _dial_ended(self, session) -> None:
        if session is self._dialing_for:
            self.carriers_dialing -= 1

    def carrier_up(self, mux: MuxConnection, session) -> None:
        self._dial_ended(session)
        self.carriers.add(mux)
        self.log.debug("{name} up", name=mux.name)

    def carrier_failed(self, reason, session) -> None:
        """A carrier dial or its authentication failed (the periodic fill retries)."""
        self._dial_ended(session)
        self.log.debug("carrier connection failed: {error}", error=reason.getErrorMessage() if reason else "closed")

    def carrier_lost(self, mux: MuxConnection, reason) -> None:
        self.carriers.lost(mux)
        if self.session is not None and self.running:
            self.log.info("{name} ended ({why}); dialling a replacement", name=mux.name,
                          why=reason.getErrorMessage() if reason is not None else "closed", event="carrier_lost")
            self.fill_soon()
