# -*- test-case-name: tests.test_server -*-
"""The server's tunnel port before a connection is trusted: the gate.

Every connection a client makes lands on ``--tunnel``.  :class:`TunnelGate`
is the raw accepted socket: it asks the handshake guard for a slot, sets the
one deadline that covers TLS and the tunnel handshake together, and looks at
the first byte (``0x16`` starts TLS, anything else must be a tunnel frame).
:class:`TunnelConnection` is what runs after TLS (if any): its first frame
makes it a control channel (HELLO) or an authenticated idle pool connection
(POOL_AUTH), which later becomes one leg of a relay.

Kept apart from :mod:`tunnelpass.tunnel.server` (the service: listeners, session,
operations) because this is the part a hostile peer talks to: every refusal,
its counting by reason and the guard's release live here, in one place.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from twisted.internet.protocol import ServerFactory

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.tunnel.lifecycle import GateLife
from tunnelpass.wire.codec import FrameDecoder, ProtocolError, Type, encode, encode_text
from tunnelpass.tunnel.control import ServerControlProtocol
from tunnelpass.tunnel.dispatch import OpenReader
from tunnelpass.tunnel.gatelog import tls_error_text, tls_failed
from tunnelpass.tunnel.guard import Refused
from tunnelpass.wire.handshake import (AUTH_FAILED, ID, MUX_CARRIER, TLS_REQUIRED, TRY_LATER, HandshakeError,
                                       mux_ok_frame)
from tunnelpass.carriers.muxconn import MuxConnection
from tunnelpass.carriers.keepalive import enable_keepalive
from tunnelpass.carriers.poolstate import HEADER, IDLE, LOST, IdleMember, ServerPoolLife
from tunnelpass.carriers.stream import IStream
from tunnelpass.carriers.switch import SwitchingProtocol
from tunnelpass.carriers.tlshalf import HalfCloseTLSProtocol

if TYPE_CHECKING:
    from tunnelpass.tunnel.server import ServerSession, TunnelServer

TLS_RECORD = 0x16
#: Why tunnel handshakes fail, for ``handshake_failures{reason}``: a fixed
#: set, so a hostile peer cannot grow the metric's label space.
FAILURE_REASONS = ("timeout", "protocol", "auth", "pool_auth", "tls", "no_tls", "closed")
POOL_OK = encode(Type.POOL_OK)
POOL_AUTH_SIZE = 2 * ID + 8 + 32
#: Carrier connections one session may hold (``--type 3``; a client keeps 2).
MAX_CARRIERS = 8


class TunnelConnection(IdleMember, SwitchingProtocol):
    """A connection on the tunnel port after TLS (if any): reads the first
    frame and becomes a control channel or an idle pool connection.

    As an idle pool connection it is a pool member (:mod:`tunnelpass.carriers.opener`):
    :meth:`claim` hands out its stream once.  Its life is a
    :class:`~tunnelpass.carriers.poolstate.ServerPoolLife`."""

    conn_id: bytes | None = None
    session: ServerSession | None = None

    def __init__(self, server: "TunnelServer", gate: "TunnelGate"):
        self.server = server
        self.gate = gate
        self.life = ServerPoolLife()
        self.decoder = FrameDecoder(allowed=frozenset({Type.HELLO, Type.POOL_AUTH, Type.MUX_AUTH}))

    def header_received(self, data: bytes) -> None:
        state = self.life.state
        if state == IDLE:
            self._idle_data(data)
            return
        if state != HEADER:
            return  # claimed and refused, or closing: nothing more is read here
        try:
            frames = self.decoder.feed(data, max_frames=1)
        except ProtocolError as e:
            self.gate.refuse(str(e))
            return
        if not frames:
            return
        frame, rest = frames[0], self.decoder.take_rest()
        if frame.type is Type.HELLO:
            try:
                self.server.guard.may_try_key(self.gate.host)  # answer a banned source before CHALLENGE
            except Refused as e:
                self.gate.turn_away(self.transport, e)
                return
            self.life.fire("hello")
            control = self.gate.control = ServerControlProtocol(
                self.server.key, tlsmod.local_fingerprint(self.transport), self.server.session_config,
                self.server.clock,
                on_session=self._control_authenticated, on_lost=self.server.control_lost,
                handshake_timeout=self.server.settings.handshake_timeout,
                may_try_key=self.gate.may_try_key, key_failed=self.gate.key_failed,
            )
            self.switch_to(control, encode(frame.type, frame.payload) + rest)
            return
        session = self.server.session
        if len(frame.payload) != POOL_AUTH_SIZE:
            self.gate.refuse(f"malformed {frame.type.name}")
            return
        wanted = Type.MUX_AUTH if self.server.settings.carrier_type == MUX_CARRIER else Type.POOL_AUTH
        if frame.type is not wanted:
            self.gate.refuse(f"{frame.type.name} at a --type {self.server.settings.carrier_type} server")
            return
        if session is None or not hmac.compare_digest(frame.payload[:ID], session.session.session_id):
            # A client whose session just ended (server restart, replaced,
            # declared dead) still dials for it: refuse, but do not count it
            # against the address -- a forger cannot get past the MAC below.
            self.gate.refuse("pool connection for no current session", penalize=False)
            return
        try:
            conn_id = session.authenticator.verify(frame, tlsmod.local_fingerprint(self.transport))
        except HandshakeError as e:
            # A guess at the session's 256-bit key (or a replay): counted,
            # never a ban -- that would let anyone who saw a session id lock
            # the session's own pool connections out.
            self.gate.refuse(e.reason, kind="pool_auth")
            return
        self.gate.passed()
        if frame.type is Type.MUX_AUTH:
            self._carrier(session, frame, rest)
            return
        if rest or not session.pool.has_room(conn_id) or not self.server.room_for_idle(session.pool):
            # The client waits for POOL_OK before it sends anything more; a
            # full pool, a reused id or no descriptor to spare gets no
            # POOL_OK, so no user uses it.
            self.transport.abortConnection()
            return
        # State and POOL_OK first: add() may hand this connection to a
        # waiting user at once, and POOL_OK must precede the user's bytes.
        self.conn_id, self.session = conn_id, session
        self.life.fire("filed")
        self.transport.write(POOL_OK)
        self._reader = OpenReader(conn_id)
        session.pool.add(conn_id, self)

    def _carrier(self, session, frame, rest: bytes) -> None:
        """An authenticated carrier connection (``--type 3``): prove the
        session back (MUX_OK), then speak HTTP/2 on it.  The client waits
        for MUX_OK before its first HTTP/2 byte, and a session has at most
        :data:`MAX_CARRIERS` of them."""
        server = self.server
        if rest or server.carriers.count_for(session) >= MAX_CARRIERS:
            self.transport.abortConnection()
            return
        self.life.fire("filed")
        self.life.fire("claimed")  # for good: the connection is the carrier's from now on
        self.transport.write(mux_ok_frame(session.session, frame.payload, tlsmod.local_fingerprint(self.transport)))
        opener = server.flow == "receive"
        mux = MuxConnection(opener, None if opener else server.acceptor, server.clock, server.settings.heartbeat,
                            on_lost=server.carrier_lost, name=f"carrier {frame.payload[24:28].hex()}")
        mux.session = session
        self.switch_to(mux)
        server.carriers.add(mux)

    def _control_authenticated(self, control: ServerControlProtocol) -> None:
        self.gate.passed()
        self.server.control_authenticated(control)

    def _idle_data(self, data: bytes) -> None:
        """Bytes on an idle pool connection: in the send flow, the client
        starts a connection with OPEN(own id, addresses); anything else is
        a violation."""
        if self.server.flow != "send":
            self.server.log.debug("unexpected data on an idle pool connection; closing it")
            self._drop_idle()
            return
        # The start frame may arrive with the user's first bytes; the
        # decoder holds at most one read beyond a (tiny) TCP frame.
        try:
            opened = self._reader.feed(data)
        except ProtocolError:
            self._drop_idle()
            return
        if opened is None:
            return
        kind, addresses, rest = opened
        self.session.pool.remove(self.conn_id)
        stream = self.claim()
        if stream is not None:
            self.server.acceptor.stream_accepted(kind, addresses, stream, rest)

    def _drop_idle(self) -> None:
        self.session.pool.remove(self.conn_id)
        self.transport.abortConnection()

    def header_lost(self, reason) -> None:
        if self.life.state == IDLE:
            self.session.pool.remove(self.conn_id)
        self.life.fire(LOST)
        self.gate.lost(reason)


class TunnelGate(SwitchingProtocol):
    """The raw accepted socket: guard, deadline, TLS detection."""

    ticket = None  # the guard's, while admitted
    control = None  # the control protocol, once the first frame was HELLO

    def __init__(self, server: "TunnelServer"):
        self.server = server
        self.life = GateLife(server.clock)

    @property
    def admitted(self) -> bool:
        """Whether the guard gave this connection a handshake slot."""
        return self.life.state not in ("accepted", "not_admitted")

    def connectionMade(self) -> None:
        self.host = self.transport.getPeer().host
        try:
            self.ticket = self.server.guard.admit(self.host, self._evicted)
        except Refused as e:
            self.life.fire("deny")
            self.server.log.debug("tunnel connection from {host} refused: {reason}", host=self.host, reason=e.text)
            self.transport.abortConnection()
            return
        self.life.fire("admit")
        enable_keepalive(self.transport)
        self.deadline = self.server.clock.callLater(self.server.settings.handshake_timeout, self._expired)

    def _evicted(self) -> None:
        """The guard gave this connection's slot to a newcomer from a source
        holding fewer: close it; our own doing, not the peer's failure."""
        if not self.life.open:
            return
        self.life.fire("evict")  # the guard has taken the slot back itself
        if self.deadline.active():
            self.deadline.cancel()
        self.server.log.debug("tunnel connection from {host} evicted: the handshake cap is full and its "
                              "address holds the most pending handshakes", host=self.host)
        self.transport.abortConnection()

    def _expired(self) -> None:
        if self.life.state == "turned_away" or self.control is not None and self.control.close_reason is not None:
            # Refused and told why, but the peer never finished the close
            # (a TLS close waits for its close_notify): end it now.
            self.lost()
            self.transport.abortConnection()
            return
        self.refuse("handshake timed out", kind="timeout")

    def may_try_key(self) -> None:
        """The control channel is about to evaluate a key."""
        try:
            self.server.guard.may_try_key(self.host)
        except Refused as e:
            raise HandshakeError(TRY_LATER, e.text) from None

    def key_failed(self) -> None:
        """The key just evaluated was wrong: counted now, not at the close."""
        ban = self.server.guard.key_failed(self.host)
        if ban is not None:
            self.server.banned(ban)

    def header_received(self, data: bytes) -> None:
        if self.life.state != "admitted":
            return
        self.life.fire("header")
        inner = TunnelConnection(self.server, self)
        level = self.server.settings.tls
        stream = IStream(self.transport, None)
        if stream is not None and stream.secured:  # TLS done on the socket (tunnelpass.carriers.tlssocket)
            self.switch_to(inner, data)
        elif data[0] == TLS_RECORD:
            if not level:
                self.refuse("TLS offered but this server runs --tls 0", kind="tls")
                return
            # A reactor without sockets (in-memory tests): Twisted's TLS.
            wrapped = HalfCloseTLSProtocol(self.server.tls_factory, inner)
            self.switch_to(wrapped, data)
        elif level:
            code = TLS_REQUIRED[level]
            self.transport.write(encode(Type.ERROR, encode_text(code, f"this server requires TLS (level {level})")))
            self.transport.loseConnection()
            self.server.plain_clients.plain(self.host, self.transport.getPeer().port)
            self._finish(False, "no_tls", "refuse")  # counted by reason; never a penalty (a learning client does it once)
        else:
            self.switch_to(inner, data)

    def passed(self) -> None:
        """The tunnel handshake (control or pool) succeeded."""
        self._finish(True, event="pass")

    def refuse(self, reason: str, penalize: bool = True, kind: str = "protocol") -> None:
        self.server.log.debug("tunnel connection from {host} refused: {reason}", host=self.host, reason=reason)
        self._finish(False if penalize else None, kind, "expire" if kind == "timeout" else "refuse")
        self.transport.abortConnection()

    def turn_away(self, transport, refusal: Refused) -> None:
        """A control connection (HELLO) its source may not make now: tell
        the peer why (a client behind the same address as a guesser learns
        it must wait), then close."""
        self.server.log.debug("control connection from {host} refused: {reason}", host=self.host,
                              reason=refusal.text)
        transport.write(encode(Type.ERROR, encode_text(TRY_LATER, refusal.text)))
        transport.loseConnection()
        # The slot and the deadline stay until the connection is gone: under
        # TLS the close waits for the peer's close_notify, which it may
        # never send.
        if self.life.can("turn_away"):
            self.life.fire("turn_away")

    def lost(self, reason=None) -> None:
        """The connection ended before its handshake passed: the control
        channel says why it refused, if it got that far; a failed TLS
        handshake (*reason*) is ``tls``."""
        control, kind = self.control, "closed"
        if control is None and tls_failed(reason):
            kind = "tls"
            self.server.log.debug("TLS handshake with {host} failed: {reason}", host=self.host,
                                  reason=tls_error_text(reason))
        if self.life.state == "turned_away" or control is not None and control.close_code == TRY_LATER:
            self._finish(None)  # refused by the guard: already counted there, says nothing new
            return
        if control is not None:
            if control.close_code == AUTH_FAILED:
                kind = "auth"  # a key was tried, and it was wrong
            elif control.close_reason == "handshake timed out":
                kind = "timeout"
            elif control.close_reason is not None:
                kind = "protocol"
        self._finish(False, kind)

    def _finish(self, succeeded: bool | None, kind: str = "closed", event: str = "lose") -> None:
        """Release the guard once (leaving an open state of :class:`GateLife`
        by *event*): True passed, False failed (counted by *kind*; only a
        wrong key, ``auth``, counts towards a ban), None neither (a refusal
        that says nothing about the peer)."""
        if self.life.open:
            self.life.fire(event if self.life.can(event) else "lose")
            deadline = self.deadline
            if deadline.active():
                deadline.cancel()
            self.server.guard.release(self.ticket)
            if succeeded is False:
                self.server.handshake_failures += 1
                self.server.failures_by_reason[kind] += 1

    def header_lost(self, reason) -> None:
        self.lost(reason)  # a failed TLS handshake on the socket ends here

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.lost()
        # Break the gate <-> delegate and gate -> ticket -> gate cycles, so
        # a closed connection is freed by reference counting, not by a full
        # collection (one per thousand pool connections is a pause of
        # hundreds of milliseconds under session churn).
        self.delegate = self.ticket = None


class _GateFactory(ServerFactory):
    noisy = False

    def __init__(self, server: "TunnelServer"):
        self.server = server

    def buildProtocol(self, addr):
        return TunnelGate(self.server)
