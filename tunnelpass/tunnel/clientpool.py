# -*- test-case-name: tests.e2e.test_tunnel_e2e -*-
"""The client's pool of data connections: each one's life, and the refill.

A pool connection is dialled to the address the control connection
reached, authenticates itself (POOL_AUTH, bound to the session and, under
TLS, to the certificate it sees), waits for the server's POOL_OK and only
then joins the idle pool.  Receive flow: the server claims it by sending
OPEN (or OPEN_UDP) and this side dials its target; send flow: a local
user's connection claims it (the client's
:class:`~tunnelpass.carriers.opener.PoolOpener`).  Each connection's life is a
:class:`~tunnelpass.carriers.poolstate.ClientPoolLife`.  :class:`PoolKeeping`
keeps the pool at the size :class:`~tunnelpass.tunnel.poolpolicy.PoolPolicy`
wants, within the open-files budget.

Kept apart from :mod:`tunnelpass.tunnel.client` (the service: session, listeners,
stop), which mixes :class:`PoolKeeping` into ``TunnelClient``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.wire.codec import ProtocolError, Type, encode
from tunnelpass.tunnel.dispatch import OpenReader
from tunnelpass.ops.fdbudget import ran_out
from tunnelpass.wire.handshake import ID, MUX_CARRIER, pool_auth_frame
from tunnelpass.carriers.keepalive import enable_keepalive
from tunnelpass.carriers.poolstate import AUTHENTICATING, CLAIMED, DIALLING, IDLE, LOST, ClientPoolLife, IdleMember
from tunnelpass.carriers.stream import stream_of
from tunnelpass.carriers.switch import SwitchingProtocol
from tunnelpass.carriers.tlshalf import HalfCloseTLSFactory
from tunnelpass.carriers.tlssocket import connect_tls

if TYPE_CHECKING:
    from tunnelpass.tunnel.client import TunnelClient

POOL_OK = encode(Type.POOL_OK)


@implementer(IHandshakeListener)
class PoolConnection(IdleMember, SwitchingProtocol):
    """One client pool connection: authenticates, idles, then relays.

    A pool member (:mod:`tunnelpass.carriers.opener`): :meth:`claim` hands out its
    stream once, while it is idle."""

    def __init__(self, client: "TunnelClient", session, counter: int, conn_id: bytes, life: ClientPoolLife):
        self.client, self.session = client, session
        self.counter, self.conn_id = counter, conn_id
        self.life = life
        self._ack = b""
        self._open = OpenReader(conn_id)

    def connectionMade(self) -> None:
        enable_keepalive(self.transport)
        if stream_of(self.transport).secured is None:
            self._authenticate()  # plain: no TLS handshake to wait for

    def handshakeCompleted(self) -> None:
        self._authenticate()

    def _authenticate(self) -> None:
        if self.session is not self.client.session:
            self.transport.loseConnection()  # dialled for a session that has ended
            return
        fp = tlsmod.peer_fingerprint(self.transport)
        self.transport.write(pool_auth_frame(self.session, self.counter, self.conn_id, fp))
        self.life.fire("auth_sent")

    def header_received(self, data: bytes) -> None:
        state = self.life.state
        if state == DIALLING:
            self.transport.abortConnection()  # the server spoke before POOL_AUTH
            return
        if state == AUTHENTICATING:
            # Only a connection the server has filed goes to the idle pool:
            # one it refused (full, busy) never carries a user's bytes.
            needed = len(POOL_OK) - len(self._ack)
            self._ack += data[:needed]
            data = data[needed:]
            if not POOL_OK.startswith(self._ack):
                self.transport.abortConnection()
                return
            if len(self._ack) < len(POOL_OK):
                return
            self.life.fire("pool_ok")
            self.client.pool_connected(self)
            if not data or not self.transport.connected:
                return
            if self.delegate is not None:  # a waiting user took it at once
                self.delegate.dataReceived(data)
                return
        if self.life.state != IDLE:
            return  # closed by the client (a session that ended): nothing more is read
        # Receive flow: the server claimed this connection; it starts with
        # OPEN(own id, the user's addresses), then the user's bytes -- or
        # OPEN_UDP, then the user's datagrams.
        client = self.client
        try:
            opened = self._open.feed(data)
        except ProtocolError:
            self.transport.abortConnection()
            return
        if opened is None:
            return
        if client.flow != "receive" or client.pool is None or client.pool.claim(self.conn_id) is not self:
            self.transport.abortConnection()
            return
        kind, addresses, rest = opened
        client.retiring.discard(self.conn_id)
        stream = self.claim()
        if stream is not None and client.acceptor.stream_accepted(kind, addresses, stream, rest):
            client.policy_used()  # refill after the user's target dial is under way

    def header_lost(self, reason) -> None:
        was = self.life.state
        self.life.fire(LOST)
        self.client.pool_lost(self, was)

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        if self.life.state == CLAIMED:
            self.life.fire(LOST)


class _PoolConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, client, session, counter, conn_id):
        self.args = (client, session, counter, conn_id)
        # The connection's life starts with the dial (counted as dialling).
        self.life = ClientPoolLife(client.pool_state_changed)

    def buildProtocol(self, addr):
        return PoolConnection(*self.args, self.life)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.life.fire(LOST)
        self.args[0].pool_dial_failed(self.args[3], reason)

    def clientConnectionLost(self, connector, reason) -> None:
        # Twisted's connector and its transport refer to each other for
        # good; a pool connection per UDP session (a DNS query) would leave
        # the pair, and this factory, for the cyclic garbage collector,
        # whose full collections pause the client.  A lost connector is
        # never used again (it is not reconnected).
        connector.transport = None


class PoolKeeping:
    """The pool part of :class:`~tunnelpass.tunnel.client.TunnelClient`: refill
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
        if self.session is not None and self.carrier == MUX_CARRIER:
            self.fill_carriers()  # --type 3: no pool (tunnelpass.tunnel.muxdial)
            return
        if self.session is None or self.policy is None:
            return
        idle = len(self.pool.idle)
        surplus = min(self.policy.surplus(idle + self.dialing), idle)
        if surplus and self.flow == "send":
            # This side claims pool connections in the send flow: closing
            # an idle one cannot race a user connection.
            for _ in range(surplus):
                _, connection = self.pool.idle.popitem(last=False)
                connection.close()
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
        self.descriptors.spend(1)
        conn_id = os.urandom(ID)
        # Straight to the address the control connection reached (no name
        # lookup per pool connection, and the same server behind a DNS
        # round robin); TLS as the control connection has it.
        factory = _PoolConnectionFactory(self, self.session, self.counter, conn_id)
        host, port = self.server_address
        if self.session_level and isinstance(self.reactor, PosixReactorBase):
            # TLS on the socket itself (tunnelpass.carriers.tlssocket).
            connect_tls(self.reactor, host, port, factory, self._creator(self.session_level),
                        timeout=self.settings.connect_timeout)
            return
        if self.session_level:  # a reactor without sockets (in-memory tests): Twisted's TLS
            factory = HalfCloseTLSFactory(self._creator(self.session_level), True, factory)
        self.reactor.connectTCP(host, port, factory, timeout=self.settings.connect_timeout)

    @property
    def dialing(self) -> int:
        """Pool connections dialled and not yet filed by the server (their
        machines are dialling or authenticating)."""
        return self.pool_pending.count

    def pool_state_changed(self, old, new) -> None:
        """Every pool connection's every state change (the one place the
        dialling count changes)."""
        self.pool_pending(old, new)

    def pool_dial_failed(self, conn_id: bytes, reason) -> None:
        code = ran_out(reason)
        if code is not None:
            self.descriptors.ran_out("dial", code, listener="pool")
        self.log.debug("pool connection failed: {error}", error=reason.getErrorMessage())

    def pool_connected(self, connection: PoolConnection) -> None:
        if self.pool is None or connection.session is not self.session:
            connection.close()  # dialled for a session that has ended
        elif not self.pool.add(connection.conn_id, connection):
            connection.close()

    def pool_lost(self, connection: PoolConnection, state: str) -> None:
        """*connection* ended before a user took it; *state* is where it was."""
        if state == IDLE and self.pool is not None:
            self.pool.remove(connection.conn_id)
            self.retiring.discard(connection.conn_id)
