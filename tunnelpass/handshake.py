# -*- test-case-name: tests.test_handshake -*-
"""Sans-IO mutual authentication for the tunnel (protocol v1).

Control connection::

    client                                   server
    HELLO(version, kind=control)     -->
                                     <--     CHALLENGE(server_nonce[32], version)
    AUTH(client_nonce[32], proof[32]) -->
                                     <--     WELCOME(server_proof[32], session_id[16], config)
                                             or ERROR(code, reason) and close

    proof        = HMAC-SHA256(key, "tunnelpass/1 client" | sn | cn | fp)
    server_proof = HMAC-SHA256(key, "tunnelpass/1 server" | sn | cn | fp)
    session_key  = HMAC-SHA256(key, "tunnelpass/1 session" | sn | cn | fp)

``fp`` is the SHA-256 fingerprint of the TLS certificate as each side sees
it (empty without TLS).  A man in the middle that terminates TLS with its own
certificate makes the two sides compute different ``fp`` and the proofs
fail: channel binding, even with a self-signed certificate and no pin.  The
key never crosses the wire; both nonces are fresh per attempt, so a recorded
handshake cannot be replayed.

Pool connection (first and only frame before relaying)::

    POOL_AUTH(session_id[16], conn_id[16], proof[32])
    proof = HMAC-SHA256(session_key, "tunnelpass/1 pool" | session_id | conn_id | fp)

``conn_id`` is 128-bit random and single use per session
(:class:`PoolAuthenticator` remembers the ones it has seen).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from tunnelpass.codec import VERSION, Frame, ProtocolError, Type, decode_text, encode, encode_text

NONCE = 32
ID = 16
KIND_CONTROL = 1

_CLIENT, _SERVER, _SESSION, _POOL = (
    b"tunnelpass/1 client", b"tunnelpass/1 server", b"tunnelpass/1 session", b"tunnelpass/1 pool"
)
_CONFIG = struct.Struct("!BBHIB")  # flow, tls, max_pool, heartbeat_ms, version

# ERROR / CLOSE codes
AUTH_FAILED = 1
BAD_VERSION = 2
PROTOCOL_VIOLATION = 3
REPLACED = 4
SHUTDOWN = 5

FLOWS = {"receive": 1, "send": 2}


class HandshakeError(Exception):
    """The handshake failed; ``code`` and ``reason`` are what the peer is told."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason

    def frame(self) -> bytes:
        return encode(Type.ERROR, encode_text(self.code, self.reason))


@dataclass(frozen=True)
class SessionConfig:
    """What the server tells an authenticated client."""

    flow: int = FLOWS["receive"]
    tls: int = 0
    max_pool: int = 1024
    heartbeat_ms: int = 5000
    version: int = VERSION

    def pack(self) -> bytes:
        return _CONFIG.pack(self.flow, self.tls, self.max_pool, self.heartbeat_ms, self.version)

    @classmethod
    def unpack(cls, raw: bytes) -> "SessionConfig":
        if len(raw) != _CONFIG.size:
            raise HandshakeError(PROTOCOL_VIOLATION, "malformed session config")
        config = cls(*_CONFIG.unpack(raw))
        if config.flow not in FLOWS.values() or config.tls not in (0, 1, 2) or not config.max_pool:
            raise HandshakeError(PROTOCOL_VIOLATION, "invalid session config")
        return config


@dataclass(frozen=True)
class Session:
    session_id: bytes
    session_key: bytes
    config: SessionConfig


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _expect(frame: Frame, frame_type: Type, size: int | None = None) -> bytes:
    if frame.type is Type.ERROR:
        code, reason = decode_text(frame.payload)
        raise HandshakeError(code, f"peer refused: {reason}")
    if frame.type is not frame_type:
        raise HandshakeError(PROTOCOL_VIOLATION, f"expected {frame_type.name}, got {frame.type.name}")
    if size is not None and len(frame.payload) != size:
        raise HandshakeError(PROTOCOL_VIOLATION, f"{frame_type.name} must be {size} bytes")
    return frame.payload


class ServerHandshake:
    """Server side of the control handshake.

    Feed each received frame to :meth:`receive`; send what it returns.  On
    success :attr:`session` is set; on failure :class:`HandshakeError` is
    raised and its :meth:`~HandshakeError.frame` should be sent before closing.
    """

    def __init__(self, key: bytes, fingerprint: bytes, config: SessionConfig, random=os.urandom):
        if not key:
            raise ValueError("empty key")
        self.key, self.fingerprint, self.config, self.random = key, fingerprint, config, random
        self.session: Session | None = None
        self._server_nonce: bytes | None = None
        self._done = False

    def receive(self, frame: Frame) -> list[bytes]:
        if self._done:
            raise HandshakeError(PROTOCOL_VIOLATION, "handshake already finished")
        if self._server_nonce is None:
            payload = _expect(frame, Type.HELLO, 2)
            version, kind = payload
            if version != VERSION:
                raise HandshakeError(BAD_VERSION, f"protocol version {version} not supported (server speaks {VERSION})")
            if kind != KIND_CONTROL:
                raise HandshakeError(PROTOCOL_VIOLATION, "unknown connection kind")
            self._server_nonce = self.random(NONCE)
            return [encode(Type.CHALLENGE, self._server_nonce + bytes([VERSION]))]
        payload = _expect(frame, Type.AUTH, NONCE + 32)
        client_nonce, proof = payload[:NONCE], payload[NONCE:]
        sn, fp = self._server_nonce, self.fingerprint
        if client_nonce == sn:
            raise HandshakeError(AUTH_FAILED, "authentication failed")  # a reflected challenge
        if not hmac.compare_digest(proof, _mac(self.key, _CLIENT, sn, client_nonce, fp)):
            raise HandshakeError(AUTH_FAILED, "authentication failed")
        self._done = True
        session_id = self.random(ID)
        self.session = Session(session_id, _mac(self.key, _SESSION, sn, client_nonce, fp), self.config)
        welcome = _mac(self.key, _SERVER, sn, client_nonce, fp) + session_id + self.config.pack()
        return [encode(Type.WELCOME, welcome)]


class ClientHandshake:
    """Client side: :meth:`start` gives HELLO, :meth:`receive` the rest."""

    def __init__(self, key: bytes, fingerprint: bytes, random=os.urandom):
        if not key:
            raise ValueError("empty key")
        self.key, self.fingerprint, self.random = key, fingerprint, random
        self.session: Session | None = None
        self._server_nonce: bytes | None = None
        self._client_nonce: bytes | None = None

    def start(self) -> bytes:
        return encode(Type.HELLO, bytes([VERSION, KIND_CONTROL]))

    def receive(self, frame: Frame) -> list[bytes]:
        if self.session is not None:
            raise HandshakeError(PROTOCOL_VIOLATION, "handshake already finished")
        if self._server_nonce is None:
            payload = _expect(frame, Type.CHALLENGE, NONCE + 1)
            if payload[NONCE] != VERSION:
                raise HandshakeError(BAD_VERSION, f"server speaks protocol version {payload[NONCE]}")
            self._server_nonce = payload[:NONCE]
            self._client_nonce = self.random(NONCE)
            proof = _mac(self.key, _CLIENT, self._server_nonce, self._client_nonce, self.fingerprint)
            return [encode(Type.AUTH, self._client_nonce + proof)]
        payload = _expect(frame, Type.WELCOME, 32 + ID + _CONFIG.size)
        sn, cn, fp = self._server_nonce, self._client_nonce, self.fingerprint
        if not hmac.compare_digest(payload[:32], _mac(self.key, _SERVER, sn, cn, fp)):
            raise HandshakeError(AUTH_FAILED, "server failed to prove it knows the key (wrong key or a man in the middle)")
        config = SessionConfig.unpack(payload[32 + ID:])
        self.session = Session(payload[32:32 + ID], _mac(self.key, _SESSION, sn, cn, fp), config)
        return []


def pool_auth_frame(session: Session, conn_id: bytes, fingerprint: bytes) -> bytes:
    """The first frame a client sends on a new pool connection."""
    if len(conn_id) != ID:
        raise ValueError("connection ids are 16 bytes")
    proof = _mac(session.session_key, _POOL, session.session_id, conn_id, fingerprint)
    return encode(Type.POOL_AUTH, session.session_id + conn_id + proof)


class PoolAuthenticator:
    """Server side check of POOL_AUTH for one session, with single-use ids.

    At most ``max_ids`` ids are remembered; past that the session must be
    renewed (the caller closes it and the client reconnects with fresh
    keys), so memory stays bounded and no id is ever accepted twice.
    """

    def __init__(self, session: Session, fingerprint: bytes, max_ids: int = 1_000_000):
        self.session, self.fingerprint, self.max_ids = session, fingerprint, max_ids
        self.used: set[bytes] = set()

    @property
    def exhausted(self) -> bool:
        return len(self.used) >= self.max_ids

    def verify(self, frame: Frame) -> bytes:
        """Return the connection id, or raise :class:`HandshakeError`."""
        payload = _expect(frame, Type.POOL_AUTH, 2 * ID + 32)
        session_id, conn_id, proof = payload[:ID], payload[ID:2 * ID], payload[2 * ID:]
        expected = _mac(self.session.session_key, _POOL, session_id, conn_id, self.fingerprint)
        if not hmac.compare_digest(session_id, self.session.session_id) or not hmac.compare_digest(proof, expected):
            raise HandshakeError(AUTH_FAILED, "pool connection authentication failed")
        if conn_id in self.used:
            raise HandshakeError(AUTH_FAILED, "pool connection id already used")
        if self.exhausted:
            raise HandshakeError(REPLACED, "session exhausted its connection ids; reconnect")
        self.used.add(conn_id)
        return conn_id


def check_protocol_frame(frame: Frame) -> None:
    """Raise ProtocolError for frames that never belong to a handshake."""
    if frame.type not in (Type.HELLO, Type.CHALLENGE, Type.AUTH, Type.WELCOME, Type.POOL_AUTH, Type.ERROR):
        raise ProtocolError(f"{frame.type.name} before authentication")
