# -*- test-case-name: tests.test_control -*-
"""The control channel of a tunnel session: one connection from the client
to the server, authenticated once, then carrying signals (PING/PONG, POOL,
RETIRE, CLOSE, ERROR).

Thin Twisted adapters over :mod:`tunnelpass.wire.codec` and
:mod:`tunnelpass.wire.handshake`:

* one deadline covers the whole unauthenticated phase (``handshake_timeout``);
* a peer that breaks the protocol is told why (ERROR) where that is safe and
  is disconnected -- only that connection;
* after authentication the server sends PING every ``heartbeat`` seconds and
  the client answers PONG; either side drops a peer silent for three
  intervals (the client's reconnect logic then takes over).
"""

from __future__ import annotations

import struct

from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from tunnelpass.wire.codec import Frame, FrameDecoder, ProtocolError, Type, decode_text, encode, encode_text
from tunnelpass.wire.handshake import (
    AUTH_FAILED,
    ID,
    PROTOCOL_VIOLATION,
    REPLACED,
    SHUTDOWN,
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    Session,
    SessionConfig,
)

#: Missed heartbeats before a peer is declared dead.
DEAD_AFTER = 3
_PING = struct.Struct("!Qd")  # sequence, sender's clock

_HANDSHAKE_TYPES = frozenset({Type.HELLO, Type.CHALLENGE, Type.AUTH, Type.WELCOME, Type.ERROR})
_SERVER_SIGNALS = frozenset({Type.PONG, Type.RETIRE, Type.CLOSE, Type.ERROR})
_CLIENT_SIGNALS = frozenset({Type.TCP, Type.PING, Type.FLUSH, Type.POOL, Type.CLOSE, Type.ERROR})


class _ControlProtocol(Protocol, TimeoutMixin):
    """What both ends share: framing, deadlines, liveness, orderly errors."""

    log = Logger(namespace="tunnelpass.control")
    session: Session | None = None
    close_reason: str | None = None
    close_code: int | None = None
    #: Whether a refusal is explained to the peer (the server tells a client
    #: why; a client never answers a server's ERROR with one of its own).
    explains_refusals = False

    def __init__(self, clock, heartbeat: float, handshake_timeout: float):
        self.clock = clock
        self.callLater = clock.callLater
        self.heartbeat = heartbeat
        self.handshake_timeout = handshake_timeout
        self.decoder = FrameDecoder(allowed=_HANDSHAKE_TYPES)
        self.last_heard = clock.seconds()

    def connectionMade(self) -> None:
        self.setTimeout(self.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.close_reason is not None:
            return  # refused or closing: nothing more from this peer counts
        self.last_heard = self.clock.seconds()
        try:
            # One frame at a time: authenticating changes which frame types
            # are allowed, and a signal may follow WELCOME in the same read.
            while self.close_reason is None:
                frames = self.decoder.feed(data, max_frames=1)
                data = b""
                if not frames:
                    break
                if self.session is None:
                    self._handshake(frames[0])
                else:
                    self.signal_received(frames[0])
        except HandshakeError as e:
            self._refuse(e)
        except ProtocolError as e:
            self._refuse(HandshakeError(PROTOCOL_VIOLATION, str(e)))

    def _refuse(self, error: HandshakeError) -> None:
        self.close_reason = error.reason
        self.close_code = error.code
        self.log.info("{peer}: {reason}", peer=_peer(self.transport), reason=error.reason)
        if self.explains_refusals and error.code != PROTOCOL_VIOLATION:
            self.transport.write(error.frame())
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def authenticated(self, session: Session, signals: frozenset) -> None:
        self.session = session
        self.decoder.allowed = signals
        self.setTimeout(None)
        self._liveness = LoopingCall(self._check_liveness)
        self._liveness.clock = self.clock
        self._liveness.start(self.heartbeat, now=False)

    def _check_liveness(self) -> None:
        if self.clock.seconds() - self.last_heard >= DEAD_AFTER * self.heartbeat:
            self.close_reason = f"peer silent for {DEAD_AFTER} heartbeats"
            self.log.warn("{peer}: {reason}", peer=_peer(self.transport), reason=self.close_reason)
            self.transport.abortConnection()
        else:
            self.tick()

    def tick(self) -> None:
        """Called every heartbeat while the peer is alive."""

    def close(self, code: int, reason: str) -> None:
        """Tell the peer why, then close (after the buffer is written)."""
        if self.transport is not None and self.close_reason is None:
            self.close_reason = reason
            self.transport.write(encode(Type.CLOSE, encode_text(code, reason)))
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.close_reason = "handshake timed out"
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        liveness = getattr(self, "_liveness", None)
        if liveness is not None and liveness.running:
            liveness.stop()

    def _peer_closed(self, frame: Frame) -> None:
        code, text = decode_text(frame.payload)
        self.close_code = code
        self.close_reason = f"peer closed: {text}"
        self.transport.loseConnection()


class ServerControlProtocol(_ControlProtocol):
    """Authenticates a client; then pings it and sends it signals.

    *on_session(protocol)* is called once authenticated (the registry there
    replaces any previous session of that client); *on_lost(protocol)* when
    the connection ends after that.  *may_try_key()* is asked just before
    the key is evaluated (it raises :class:`HandshakeError` to refuse), and
    *key_failed()* is told at once when it was wrong: the rationing of key
    guesses happens at evaluation, whatever the peer does afterwards.
    """

    explains_refusals = True

    def __init__(self, key: bytes, fingerprint: bytes, config: SessionConfig, clock,
                 on_session, on_lost, handshake_timeout: float = 5.0,
                 may_try_key=lambda: None, key_failed=lambda: None):
        super().__init__(clock, config.heartbeat_ms / 1000, handshake_timeout)
        self.handshake = ServerHandshake(key, fingerprint, config)
        self.on_session, self.on_lost = on_session, on_lost
        self.may_try_key, self.key_failed = may_try_key, key_failed
        self.rtt: float | None = None
        self.on_retire = lambda conn_id: None
        self._ping_sequence = 0
        self._ping_sent_at = 0.0

    def _handshake(self, frame: Frame) -> None:
        if frame.type is Type.AUTH:
            self.may_try_key()
        try:
            replies = self.handshake.receive(frame)
        except HandshakeError as e:
            if e.code == AUTH_FAILED:
                self.key_failed()
            raise
        for reply in replies:
            self.transport.write(reply)
        if self.handshake.session is not None:
            self.authenticated(self.handshake.session, _SERVER_SIGNALS)
            self.on_session(self)

    def tick(self) -> None:
        self._ping_sequence += 1
        self._ping_sent_at = self.clock.seconds()
        self.transport.write(encode(Type.PING, _PING.pack(self._ping_sequence, 0.0)))

    def signal_received(self, frame: Frame) -> None:
        if frame.type is Type.PONG:
            if len(frame.payload) == _PING.size:
                sequence, _ = _PING.unpack(frame.payload)
                if sequence == self._ping_sequence:  # timed by our own clock only
                    self.rtt = max(0.0, self.clock.seconds() - self._ping_sent_at)
        elif frame.type is Type.RETIRE:
            if len(frame.payload) != ID:
                raise ProtocolError("RETIRE signal must carry a 16-byte id")
            self.on_retire(frame.payload)
        else:  # CLOSE or ERROR
            self._peer_closed(frame)

    def send_pool(self, count: int) -> None:
        self.transport.write(encode(Type.POOL, struct.pack("!H", min(count, 0xFFFF))))

    def replaced(self) -> None:
        self.close(REPLACED, "replaced by a newer session")

    def shutdown(self) -> None:
        self.close(SHUTDOWN, "server shutting down")

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        if self.session is not None:
            self.on_lost(self)


class ClientControlProtocol(_ControlProtocol):
    """Authenticates to a server and carries out its signals.

    *handler* gets ``session_started(protocol)``, ``dial_pool(count)`` and
    ``control_lost(protocol)``.  TCP and FLUSH, which a server of an
    earlier release may send, are checked and ignored: the OPEN frame on the
    pool connection itself is what starts a relay, and idle connections are
    retired one by one (RETIRE).
    *fingerprint* is called once the server's first frame has arrived (the
    TLS handshake is complete by then) and returns the SHA-256 of the
    certificate this side sees (``b""`` without TLS).
    """

    def __init__(self, key: bytes, fingerprint, handler, clock, heartbeat: float = 5.0,
                 handshake_timeout: float = 5.0):
        super().__init__(clock, heartbeat, handshake_timeout)
        self.handshake = ClientHandshake(key, b"")
        self.fingerprint = fingerprint
        self.handler = handler

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.handshake.start())

    def _handshake(self, frame: Frame) -> None:
        self.handshake.fingerprint = self.fingerprint(self.transport)
        for reply in self.handshake.receive(frame):
            self.transport.write(reply)
        if self.handshake.session is not None:
            session = self.handshake.session
            # The server's heartbeat governs how soon silence means death.
            self.heartbeat = session.config.heartbeat_ms / 1000
            self.authenticated(session, _CLIENT_SIGNALS)
            self.handler.session_started(self)

    def signal_received(self, frame: Frame) -> None:
        kind = frame.type
        if kind is Type.PING:
            self.transport.write(encode(Type.PONG, frame.payload))
        elif kind is Type.TCP:  # from an older server: advisory, OPEN is what counts
            if len(frame.payload) != ID:
                raise ProtocolError("TCP signal must carry a 16-byte id")
        elif kind is Type.POOL:
            if len(frame.payload) != 2:
                raise ProtocolError("POOL signal must carry a 16-bit count")
            self.handler.dial_pool(struct.unpack("!H", frame.payload)[0])
        elif kind is Type.FLUSH:  # from an older server (which never sent it): nothing to do
            pass
        else:  # CLOSE or ERROR
            self._peer_closed(frame)

    def retire(self, conn_id: bytes) -> None:
        """Ask the server to close idle pool connection *conn_id*.  In the
        receive flow only the server claims pool connections, so only it
        can close an idle one without racing a user connection."""
        if self.close_reason is None:
            self.transport.write(encode(Type.RETIRE, conn_id))

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.lost_reason = reason  # why, for the client's log (a TLS failure, a reset)
        self.handler.control_lost(self)


def _peer(transport) -> str:
    try:
        address = transport.getPeer()
        return f"{address.host}:{address.port}"
    except Exception:
        return "peer"
