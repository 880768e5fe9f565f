# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""The client's pool of data connections: each one's life, and the refill.

A pool connection is dialled to the address the control connection
reached, authenticates itself (POOL_AUTH, bound to the session and, under
TLS, to the certificate it sees), waits for the server's POOL_OK and only
then joins the idle pool.  Receive flow: the server claims it by sending
OPEN (or OPEN_UDP) and this side dials its target; send flow: a local
user's connection claims it (:class:`SendFlowFactory`).  :class:`PoolKeeping`
keeps the pool at the size :class:`~tunnelpass.poolpolicy.PoolPolicy`
wants, within the open-files budget.

Kept apart from :mod:`tunnelpass.client` (the service: session, listeners,
stop), which mixes :class:`PoolKeeping` into ``TunnelClient``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from tunnelpass import tls as tlsmod
from tunnelpass.codec import OPENS, FrameDecoder, ProtocolError, Type, decode_open, encode, encode_open
from tunnelpass.fdbudget import ran_out
from tunnelpass.handshake import ID, pool_auth_frame
from tunnelpass.keepalive import enable_keepalive
from tunnelpass.pooldial import PoolDialFactory
from tunnelpass.outbound import OutboundProtocol, user_addresses
from tunnelpass.switch import SwitchingProtocol
from tunnelpass.tlshalf import HalfCloseTLSFactory

if TYPE_CHECKING:
    from tunnelpass.client import TunnelClient

POOL_OK = encode(Type.POOL_OK)


@implementer(IHandshakeListener)


class PoolConnection(SwitchingProtocol):
    """One client pool connection: authenticates, idles, then relays."""

    ready = False  # the server filed it (POOL_OK received)
    authenticated = False  # POOL_AUTH sent

    def __init__(self, client: "TunnelClient", session, counter: int, conn_id: bytes):
        self.client, self.session = client, session
        self.counter, self.conn_id = counter, conn_id
        self._ack = b""
        self._open_decoder = FrameDecoder(allowed=OPENS)

    def connectionMade(self) -> None:
        enable_keepalive(self.transport)
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._authenticate()

    def handshakeCompleted(self) -> None:
        self._authenticate()

    def _authenticate(self) -> None:
        if self.session is not self.client.session:
            self.transport.loseConnection()  # dialled for a session that has ended
            return
        fp = tlsmod.peer_fingerprint(self.transport)
        self.transport.write(pool_auth_frame(self.session, self.counter, self.conn_id, fp))
        self.authenticated = True

    def header_received(self, data: bytes) -> None:
        if not self.ready:
            # Only a connection the server has filed goes to the idle pool:
            # one it refused (full, busy) never carries a user's bytes.
            needed = len(POOL_OK) - len(self._ack)
            self._ack += data[:needed]
            data = data[needed:]
            if not POOL_OK.startswith(self._ack) or not self.authenticated:
                self.transport.abortConnection()
                return
            if len(self._ack) < len(POOL_OK):
                return
            self.ready = True
            self.client.pool_connected(self)
            if not data or not self.transport.connected:
                return
            if self.delegate is not None:  # a waiting user took it at once
                self.delegate.dataReceived(data)
                return
        # Receive flow: the server claimed this connection; it starts with
        # OPEN(own id, the user's addresses), then the user's bytes -- or
        # OPEN_UDP, then the user's datagrams.
        client = self.client
        try:
            frames = self._open_decoder.feed(data, max_frames=1)
            if not frames:
                return
            conn_id, addresses = decode_open(frames[0].payload)
        except ProtocolError:
            self.transport.abortConnection()
            return
        if (conn_id != self.conn_id or client.flow != "receive" or client.pool is None
                or client.pool.claim(self.conn_id) is not self):
            self.transport.abortConnection()
            return
        rest = self._open_decoder.take_rest()
        if frames[0].type is Type.OPEN_UDP:
            protocol = client.udp_egress.open(addresses)
        elif client.settings.tcp:
            protocol = client.target_factory.buildProtocol(None)
            protocol.original = addresses  # the user's, for --proxy-protocol
        else:
            client.log.debug("TCP is disabled here (--no-tcp); closing a TCP pool connection")
            protocol = None
        if protocol is None:
            client.retiring.discard(self.conn_id)
            self.transport.abortConnection()
            return
        self.start_relay(protocol, rest)

    def start_relay(self, protocol, data: bytes = b"") -> None:
        client = self.client
        client.retiring.discard(self.conn_id)
        self.switch_to(protocol, data)
        client.policy_used()  # refill after the user's target dial is under way

    def header_lost(self, reason) -> None:
        self.client.pool_lost(self)


class _PoolConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, client, session, counter, conn_id):
        self.args = (client, session, counter, conn_id)

    def buildProtocol(self, addr):
        return PoolConnection(*self.args)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.args[0].pool_dial_failed(self.args[3], reason)

    def clientConnectionLost(self, connector, reason) -> None:
        # Twisted's connector and its transport refer to each other for
        # good; a pool connection per UDP session (a DNS query) would leave
        # the pair, and this factory, for the cyclic garbage collector,
        # whose full collections pause the client.  A lost connector is
        # never used again (it is not reconnected).
        connector.transport = None


class SendFlowFactory(PoolDialFactory):
    """Send flow: each local user connection takes an idle pool connection,
    which starts with OPEN (its id, the user's addresses)."""

    unavailable = "not connected to the server"

    def __init__(self, client: "TunnelClient", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client = client

    def current_pool(self):
        return self.client.pool

    def use(self, conn_id: bytes, connection, inbound) -> None:
        self.client.policy_used()
        source, destination = user_addresses(inbound)
        connection.switch_to(OutboundProtocol(inbound, greeting=encode_open(conn_id, source, destination)))


class PoolKeeping:
    """The pool part of :class:`~tunnelpass.client.TunnelClient`: refill
    (soon, coalesced), trim a surplus, dial one, and the outcome of each dial."""

    def _want_more(self, count: int) -> None:
        if self.policy is not None:
            self.policy.requested(count)
            self.fill_soon()

    def policy_used(self) -> None:
        if self.policy is not None and self.pool is not None:
            self.policy.used()
            self.fill_soon()

    def fill_soon(self) -> None:
        """Refill on the next reactor turn: user connections in flight go
        first, and claims that arrive together share one refill."""
        if self._fill_call is None:
            self._fill_call = self.clock.callLater(0, self._scheduled_fill)

    def _scheduled_fill(self) -> None:
        self._fill_call = None
        self.fill()

    def fill(self) -> None:
        if self.session is None or self.policy is None:
            return
        idle = len(self.pool.idle)
        surplus = min(self.policy.surplus(idle + self.dialing), idle)
        if surplus and self.flow == "send":
            # This side claims pool connections in the send flow: closing
            # an idle one cannot race a user connection.
            for _ in range(surplus):
                _, connection = self.pool.idle.popitem(last=False)
                connection.transport.loseConnection()
        elif surplus and self.control is not None:
            # Receive flow: the server claims; ask it to retire the oldest.
            for conn_id in list(self.pool.idle)[:surplus]:
                if conn_id not in self.retiring:
                    self.retiring.add(conn_id)
                    self.control.retire(conn_id)
        # Each pool connection, and the leg it will need once a user takes
        # it, must fit in the open-files limit next to the users' own.
        room = self.descriptors.dial_allowance(len(self.pool.idle) + self.dialing)
        for _ in range(self.policy.to_dial(len(self.pool.idle), self.dialing, room)):
            self._dial_one()

    def _dial_one(self) -> None:
        self.counter += 1
        self.dialing += 1
        self.descriptors.spend(1)
        conn_id = os.urandom(ID)
        # Straight to the address the control connection reached (no name
        # lookup per pool connection, and the same server behind a DNS
        # round robin); TLS as the control connection has it.
        factory = _PoolConnectionFactory(self, self.session, self.counter, conn_id)
        if self.session_level:
            factory = HalfCloseTLSFactory(self._creator(self.session_level), True, factory)
        host, port = self.server_address
        self.reactor.connectTCP(host, port, factory, timeout=self.settings.connect_timeout)

    def pool_dial_failed(self, conn_id: bytes, reason) -> None:
        self.dialing -= 1
        code = ran_out(reason)
        if code is not None:
            self.descriptors.ran_out("dial", code, listener="pool")
        self.log.debug("pool connection failed: {error}", error=reason.getErrorMessage())

    def pool_connected(self, connection: PoolConnection) -> None:
        self.dialing -= 1
        if self.pool is None or connection.session is not self.session:
            connection.transport.loseConnection()  # dialled for a session that has ended
        elif not self.pool.add(connection.conn_id, connection):
            connection.transport.loseConnection()

    def pool_lost(self, connection: PoolConnection) -> None:
        if not connection.ready:
            self.dialing -= 1  # connected but never authenticated (TLS failure, ...)
        elif self.pool is not None:
            self.pool.remove(connection.conn_id)
            self.retiring.discard(connection.conn_id)
