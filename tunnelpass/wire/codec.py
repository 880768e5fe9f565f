# -*- test-case-name: tests.test_codec -*-
"""Sans-IO framing for the tunnel's control and pool connections (protocol v1).

Every message is one frame::

    +--------+--------+----------------+----------------------+
    | type   | flags  | length (BE16)  | payload (length B)   |
    +--------+--------+----------------+----------------------+

``flags`` must be 0 in v1.  Each type has its own maximum payload size,
checked from the header *before* any payload is buffered, so between reads a
decoder holds at most one partial frame (``LARGEST_FRAME`` bytes).  An unknown type, a
non-zero flags byte or an oversized length is a :class:`ProtocolError`, and
the connection that sent it is closed (only that one).

docs/protocol.rst is the normative description; this module and the
handshake in :mod:`tunnelpass.wire.handshake` implement it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!BBH")
HEADER_SIZE = HEADER.size
VERSION = 1


class ProtocolError(Exception):
    """The peer broke the protocol; close its connection."""


class Type(enum.IntEnum):
    HELLO = 1  # client -> server, first frame of every connection
    CHALLENGE = 2  # server -> client: server nonce
    AUTH = 3  # client -> server: client nonce + proof
    WELCOME = 4  # server -> client: proof + session config
    POOL_AUTH = 5  # client -> server, first frame of a pool connection
    POOL_OK = 6  # server -> client: that pool connection is filed as idle
    OPEN = 7  # on a pool connection, by the side that claims it: id + the user's addresses
    OPEN_UDP = 8  # as OPEN, for a UDP session: length-prefixed datagrams follow (tunnelpass.wire.datagrams)
    MUX_AUTH = 9  # client -> server, first frame of a multiplexed carrier connection (--type 3)
    MUX_OK = 10  # server -> client: its proof; HTTP/2 follows on both sides
    TCP = 16  # server -> client, older servers only: advisory, ignored (OPEN starts a relay)
    PING = 17
    PONG = 18
    FLUSH = 19  # server -> client, never sent: ignored
    POOL = 20  # server -> client: dial <n> more pool connections
    CLOSE = 21  # either way: code + reason, then close
    ERROR = 22  # either way: code + reason, then close
    RETIRE = 23  # client -> server: close idle pool connection <id> if it is still idle


#: Largest payload accepted per type (bytes).
MAX_PAYLOAD = {
    Type.HELLO: 2,
    Type.CHALLENGE: 33,
    Type.AUTH: 64,
    Type.WELCOME: 64,
    Type.POOL_AUTH: 72,
    Type.POOL_OK: 0,
    Type.OPEN: 16 + 1 + 2 * (16 + 2),
    Type.OPEN_UDP: 16 + 1 + 2 * (16 + 2),
    Type.MUX_AUTH: 72,
    Type.MUX_OK: 32,
    Type.TCP: 16,
    Type.PING: 16,
    Type.PONG: 16,
    Type.FLUSH: 0,
    Type.POOL: 2,
    Type.CLOSE: 2 + 256,
    Type.ERROR: 2 + 256,
    Type.RETIRE: 16,
}
LARGEST_FRAME = HEADER_SIZE + max(MAX_PAYLOAD.values())


@dataclass(frozen=True)
class Frame:
    type: Type
    payload: bytes = b""


def encode(frame_type: Type, payload: bytes = b"") -> bytes:
    """One frame on the wire; refuses payloads over the type's maximum."""
    limit = MAX_PAYLOAD[frame_type]
    if len(payload) > limit:
        raise ValueError(f"{frame_type.name} payload of {len(payload)} bytes exceeds {limit}")
    return HEADER.pack(frame_type, 0, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole frames.

    After a :class:`ProtocolError` the decoder is poisoned and raises again
    on any further input: the connection must be closed.
    """

    def __init__(self, allowed: frozenset[Type] | None = None):
        self.allowed = allowed
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes, max_frames: int | None = None) -> list[Frame]:
        """Decode whole frames from what has arrived.

        With *max_frames*, stop after that many: what follows stays buffered
        for :meth:`take_rest` (a pool connection's relay data after its
        POOL_AUTH is not framed).
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames = []
        try:
            while len(self._buffer) >= HEADER_SIZE and (max_frames is None or len(frames) < max_frames):
                raw_type, flags, length = HEADER.unpack_from(self._buffer)
                frame_type = self._check(raw_type, flags, length)
                end = HEADER_SIZE + length
                if len(self._buffer) < end:
                    break
                frames.append(Frame(frame_type, bytes(self._buffer[HEADER_SIZE:end])))
                del self._buffer[:end]
        except ProtocolError as e:
            self._error = e
            self._buffer.clear()
            raise
        return frames

    def _check(self, raw_type: int, flags: int, length: int) -> Type:
        try:
            frame_type = Type(raw_type)
        except ValueError:
            raise ProtocolError(f"unknown frame type {raw_type}") from None
        if self.allowed is not None and frame_type not in self.allowed:
            raise ProtocolError(f"unexpected {frame_type.name} frame")
        if flags:
            raise ProtocolError(f"non-zero flags {flags:#x} in {frame_type.name} frame")
        if length > MAX_PAYLOAD[frame_type]:
            raise ProtocolError(
                f"{frame_type.name} frame of {length} bytes exceeds {MAX_PAYLOAD[frame_type]}"
            )
        return frame_type

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (bounded by LARGEST_FRAME)."""
        return len(self._buffer)

    def take_rest(self) -> bytes:
        """Bytes after the last whole frame (e.g. relay data after POOL_AUTH)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


# Payload helpers for the fixed-layout messages.

def encode_text(code: int, reason: str) -> bytes:
    """CLOSE / ERROR payload: a 16-bit code and up to 256 bytes of UTF-8."""
    raw = reason.encode("utf-8", "replace")[:256]
    return struct.pack("!H", code) + raw


def decode_text(payload: bytes) -> tuple[int, str]:
    """Code and reason; control characters in the peer's text become '?' so
    it cannot forge log lines."""
    if len(payload) < 2:
        raise ProtocolError("truncated CLOSE/ERROR payload")
    (code,) = struct.unpack_from("!H", payload)
    text = payload[2:].decode("utf-8", "replace")
    return code, "".join(c if c.isprintable() else "?" for c in text)


# OPEN: the first frame on a claimed pool connection

_FAMILIES = {0: 0, 4: 4, 6: 16}  # family byte -> address size


OPENS = frozenset({Type.OPEN, Type.OPEN_UDP})


def encode_open(conn_id: bytes, source=None, destination=None, frame_type: Type = Type.OPEN) -> bytes:
    """OPEN(conn_id | family | src ip | src port | dst ip | dst port); the
    addresses are the user connection's (for PROXY headers), or absent.
    *frame_type* OPEN_UDP starts a UDP session instead of a TCP stream."""
    import ipaddress

    if frame_type not in OPENS:
        raise ValueError("an OPEN frame is OPEN or OPEN_UDP")
    if len(conn_id) != 16:
        raise ValueError("connection ids are 16 bytes")
    if source is None or destination is None:
        return encode(frame_type, conn_id + b"\x00")
    try:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    except ValueError:
        return encode(frame_type, conn_id + b"\x00")  # not IP (e.g. a UNIX socket): unknown
    if src.version != dst.version:
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    body = bytes([src.version]) + src.packed + struct.pack("!H", source[1]) + dst.packed + struct.pack("!H", destination[1])
    return encode(frame_type, conn_id + body)


def decode_open(payload: bytes):
    """``(conn_id, (source, destination) or None)``; :class:`ProtocolError`
    if malformed."""
    import ipaddress

    if len(payload) < 17:
        raise ProtocolError("OPEN too short")
    conn_id, family = payload[:16], payload[16]
    size = _FAMILIES.get(family)
    if size is None:
        raise ProtocolError("OPEN has an unknown address family")
    if len(payload) != 17 + 2 * (size + 2 if size else 0):
        raise ProtocolError("OPEN has the wrong length for its family")
    if not size:
        return conn_id, None
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    src = str(make(payload[17:17 + size]))
    (sport,) = struct.unpack_from("!H", payload, 17 + size)
    dst = str(make(payload[19 + size:19 + 2 * size]))
    (dport,) = struct.unpack_from("!H", payload, 19 + 2 * size)
    return conn_id, ((src, sport), (dst, dport))
