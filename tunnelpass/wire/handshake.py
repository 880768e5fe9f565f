# -*- test-case-name: tests.test_handshake -*-
"""Sans-IO mutual authentication for the tunnel (protocol v1).

Control connection::

    client                                   server
    HELLO(version, kind=control)     -->
                                     <--     CHALLENGE(server_nonce[32], version)
    AUTH(client_nonce[32], proof[32]) -->
                                     <--     WELCOME(server_proof[32], session_id[16], config)
                                             or ERROR(code, reason) and close

    t            = HELLO payload | CHALLENGE payload   (the transcript so far)
    proof        = HMAC-SHA256(key, "tunnelpass/1 client" | sn | cn | fp | t)
    server_proof = HMAC-SHA256(key, "tunnelpass/1 server" | sn | cn | fp | t | session_id | config)
    session_key  = HMAC-SHA256(key, "tunnelpass/1 session" | sn | cn | fp | t)

``fp`` is the SHA-256 fingerprint of the TLS certificate as each side sees
it (empty without TLS).  A man in the middle that terminates TLS with its own
certificate makes the two sides compute different ``fp`` and the proofs
fail: channel binding, even with a self-signed certificate and no pin.  The
key never crosses the wire; both nonces are fresh per attempt, so a recorded
handshake cannot be replayed.  Every byte of the exchange is covered by a
MAC (versions, session id, config), so nothing can be downgraded or altered
in transit.  The key must be high-entropy: anyone a client talks to can
collect a proof and try keys offline.

Pool connection (first and only frame before relaying)::

    POOL_AUTH(session_id[16], counter[8], conn_id[16], proof[32])
    proof = HMAC-SHA256(session_key, "tunnelpass/1 pool" | session_id | counter | conn_id | fp)

``conn_id`` is 128-bit random; ``counter`` counts the session's pool
connections from 1, and :class:`PoolAuthenticator` accepts each counter once
within a sliding window (as IPsec's anti-replay window), so a recorded
POOL_AUTH can never be replayed and memory stays a few kilobytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from tunnelpass.wire.codec import VERSION, Frame, Type, decode_text, encode, encode_text

NONCE = 32
ID = 16
KIND_CONTROL = 1

_CLIENT, _SERVER, _SESSION, _POOL, _MUX, _MUX_OK = (
    b"tunnelpass/1 client", b"tunnelpass/1 server", b"tunnelpass/1 session", b"tunnelpass/1 pool",
    b"tunnelpass/1 mux", b"tunnelpass/1 mux ok",
)
_CONFIG = struct.Struct("!BBHIB")  # flow, tls, max_pool, heartbeat_ms, version (+ carrier type, when not 0)
#: Carrier types (NodePass's pool ``type``): 0 one TCP connection per
#: stream (the pool), 3 streams multiplexed on HTTP/2 connections.
POOL_CARRIER, MUX_CARRIER = 0, 3
CARRIERS = (POOL_CARRIER, MUX_CARRIER)
_COUNTER = struct.Struct("!Q")
MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS = 100, 600_000

# ERROR / CLOSE codes
AUTH_FAILED = 1
BAD_VERSION = 2
PROTOCOL_VIOLATION = 3
REPLACED = 4
SHUTDOWN = 5
#: The server speaks TLS at this level; sent in plain text to a client that
#: connected without TLS (it retries with TLS; the level is MAC'd later).
TLS_REQUIRED = {1: 6, 2: 7}
#: A control connection the server turns away (its address has had too
#: many wrong keys, or the pending-handshake cap is full): try again later.
TRY_LATER = 8

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
    carrier: int = POOL_CARRIER

    def pack(self) -> bytes:
        """9 bytes for the pool carrier (what every release understands), a
        tenth naming any other carrier."""
        packed = _CONFIG.pack(self.flow, self.tls, self.max_pool, self.heartbeat_ms, self.version)
        return packed + bytes([self.carrier]) if self.carrier != POOL_CARRIER else packed

    @classmethod
    def unpack(cls, raw: bytes) -> "SessionConfig":
        if len(raw) not in CONFIG_SIZES:
            raise HandshakeError(PROTOCOL_VIOLATION, "malformed session config")
        config = cls(*_CONFIG.unpack(raw[:_CONFIG.size]), *raw[_CONFIG.size:])
        if (config.flow not in FLOWS.values() or config.tls not in (0, 1, 2) or not config.max_pool
                or not MIN_HEARTBEAT_MS <= config.heartbeat_ms <= MAX_HEARTBEAT_MS
                or config.version != VERSION or config.carrier not in CARRIERS):
            raise HandshakeError(PROTOCOL_VIOLATION, "invalid session config")
        return config


CONFIG_SIZES = (_CONFIG.size, _CONFIG.size + 1)
_AUTH_LABELS = {Type.POOL_AUTH: _POOL, Type.MUX_AUTH: _MUX}


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


class _Poisonable:
    """After any failure the handshake refuses everything: one connection
    gets one attempt, however much it sends after being refused."""

    _failed: HandshakeError | None = None

    def receive(self, frame: Frame) -> list[bytes]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._receive(frame)
        except HandshakeError as e:
            self._failed = e
            raise


class ServerHandshake(_Poisonable):
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

    def _receive(self, frame: Frame) -> list[bytes]:
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
            challenge = self._server_nonce + bytes([VERSION])
            self._transcript = payload + challenge
            return [encode(Type.CHALLENGE, challenge)]
        payload = _expect(frame, Type.AUTH, NONCE + 32)
        client_nonce, proof = payload[:NONCE], payload[NONCE:]
        sn, fp, t = self._server_nonce, self.fingerprint, self._transcript
        if client_nonce == sn:
            raise HandshakeError(AUTH_FAILED, "authentication failed")  # a reflected challenge
        if not hmac.compare_digest(proof, _mac(self.key, _CLIENT, sn, client_nonce, fp, t)):
            raise HandshakeError(AUTH_FAILED, "authentication failed")
        self._done = True
        session_id = self.random(ID)
        config = self.config.pack()
        self.session = Session(session_id, _mac(self.key, _SESSION, sn, client_nonce, fp, t), self.config)
        welcome = _mac(self.key, _SERVER, sn, client_nonce, fp, t, session_id, config) + session_id + config
        return [encode(Type.WELCOME, welcome)]


class ClientHandshake(_Poisonable):
    """Client side: :meth:`start` gives HELLO, :meth:`receive` the rest."""

    def __init__(self, key: bytes, fingerprint: bytes, random=os.urandom):
        if not key:
            raise ValueError("empty key")
        self.key, self.fingerprint, self.random = key, fingerprint, random
        self.session: Session | None = None
        self._server_nonce: bytes | None = None
        self._client_nonce: bytes | None = None
        self._hello = bytes([VERSION, KIND_CONTROL])

    def start(self) -> bytes:
        self._hello = bytes([VERSION, KIND_CONTROL])
        return encode(Type.HELLO, self._hello)

    def _receive(self, frame: Frame) -> list[bytes]:
        if self.session is not None:
            raise HandshakeError(PROTOCOL_VIOLATION, "handshake already finished")
        if self._server_nonce is None:
            payload = _expect(frame, Type.CHALLENGE, NONCE + 1)
            if payload[NONCE] != VERSION:
                raise HandshakeError(BAD_VERSION, f"server speaks protocol version {payload[NONCE]}")
            self._server_nonce = payload[:NONCE]
            self._client_nonce = self.random(NONCE)
            self._transcript = self._hello + payload
            proof = _mac(self.key, _CLIENT, self._server_nonce, self._client_nonce, self.fingerprint,
                         self._transcript)
            return [encode(Type.AUTH, self._client_nonce + proof)]
        payload = _expect(frame, Type.WELCOME)
        if len(payload) - 32 - ID not in CONFIG_SIZES:
            raise HandshakeError(PROTOCOL_VIOLATION, "WELCOME has a malformed size")
        sn, cn, fp, t = self._server_nonce, self._client_nonce, self.fingerprint, self._transcript
        session_id, config_bytes = payload[32:32 + ID], payload[32 + ID:]
        if not hmac.compare_digest(payload[:32], _mac(self.key, _SERVER, sn, cn, fp, t, session_id, config_bytes)):
            raise HandshakeError(AUTH_FAILED, "server failed to prove it knows the key (wrong key or a man in the middle)")
        config = SessionConfig.unpack(config_bytes)
        self.session = Session(session_id, _mac(self.key, _SESSION, sn, cn, fp, t), config)
        return []


def pool_auth_frame(session: Session, counter: int, conn_id: bytes, fingerprint: bytes,
                    frame_type: Type = Type.POOL_AUTH) -> bytes:
    """The first frame a client sends on its *counter*-th pool connection
    (or, with ``Type.MUX_AUTH``, on a multiplexed carrier connection: the
    same proof under another label, so neither can stand for the other)."""
    if len(conn_id) != ID:
        raise ValueError("connection ids are 16 bytes")
    if not 1 <= counter < 2**64:
        raise ValueError("pool counters run from 1")
    packed = _COUNTER.pack(counter)
    proof = _mac(session.session_key, _AUTH_LABELS[frame_type], session.session_id, packed, conn_id, fingerprint)
    return encode(frame_type, session.session_id + packed + conn_id + proof)


def mux_ok_frame(session: Session, auth_payload: bytes, fingerprint: bytes) -> bytes:
    """The server's answer to a MUX_AUTH it accepted: its own proof over
    that MUX_AUTH and the certificate it served, so the client knows the
    carrier ends at the server of its session (mutual, channel-bound)."""
    return encode(Type.MUX_OK, _mac(session.session_key, _MUX_OK, auth_payload[:2 * ID + 8], fingerprint))


def check_mux_ok(session: Session, auth_frame: bytes, fingerprint: bytes, frame: Frame) -> None:
    """Raise :class:`HandshakeError` unless *frame* is the MUX_OK the
    server of *session* owes for *auth_frame* (the MUX_AUTH sent, whole)."""
    proof = _expect(frame, Type.MUX_OK, 32)
    expected = _mac(session.session_key, _MUX_OK, auth_frame[4:4 + 2 * ID + 8], fingerprint)
    if not hmac.compare_digest(proof, expected):
        raise HandshakeError(AUTH_FAILED, "the server failed to prove the session on a carrier connection "
                                          "(a man in the middle, or a stale session)")


class ReplayWindow:
    """Accepts each counter at most once: anything above the highest seen,
    or within *size* below it and not seen yet (a bitmap, like IPsec's)."""

    def __init__(self, size: int = 65536):
        self.size = size
        self.highest = 0
        self.bits = 0  # bit i set: counter (highest - i) was seen

    def accept(self, counter: int) -> bool:
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = counter
            return True
        offset = self.highest - counter
        if offset >= self.size or self.bits >> offset & 1:
            return False
        self.bits |= 1 << offset
        return True


class PoolAuthenticator:
    """Server-side check of POOL_AUTH and MUX_AUTH for one session."""

    def __init__(self, session: Session, fingerprint: bytes, window: int = 65536):
        self.session, self.fingerprint = session, fingerprint
        self.window = ReplayWindow(window)

    def verify(self, frame: Frame, fingerprint: bytes | None = None) -> bytes:
        """Return the connection id, or raise :class:`HandshakeError`.

        A POOL_AUTH or a MUX_AUTH: both draw on the one counter window.
        *fingerprint* is that of the certificate this connection was served
        (it changes when the server reloads its pair mid-session)."""
        label = _AUTH_LABELS.get(frame.type)
        payload = _expect(frame, frame.type if label else Type.POOL_AUTH, 2 * ID + 8 + 32)
        session_id, packed = payload[:ID], payload[ID:ID + 8]
        conn_id, proof = payload[ID + 8:2 * ID + 8], payload[2 * ID + 8:]
        fp = self.fingerprint if fingerprint is None else fingerprint
        expected = _mac(self.session.session_key, label, session_id, packed, conn_id, fp)
        if not hmac.compare_digest(session_id, self.session.session_id) or not hmac.compare_digest(proof, expected):
            raise HandshakeError(AUTH_FAILED, "pool connection authentication failed")
        (counter,) = _COUNTER.unpack(packed)
        if counter == 0 or not self.window.accept(counter):
            raise HandshakeError(AUTH_FAILED, "pool connection replayed or too old")
        return conn_id
