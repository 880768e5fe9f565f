# -*- test-case-name: tests.test_proxyproto -*-
"""PROXY protocol v1 and v2 (HAProxy's spec), sans-IO: encode the header a relay sends, parse the one a listener reads.

:func:`encode_v1` / :func:`encode_v2` build the header an egress side sends
its target so the target sees the original client address; :func:`parse`
reads one at the start of a stream (for listeners that accept it from
trusted sources only).  Parsing is incremental and strict: the header is
found from its first bytes, sizes are checked before anything is buffered
(v1: 107 bytes at most; v2: ``max_v2`` bytes at most), and anything
malformed raises :class:`ProxyError` -- never a guess.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")
V2_MAX_DEFAULT = 16 + 4096  # addresses plus generous TLVs

_V2_FAMILIES = {  # (family byte) -> (protocol name, address size)
    0x11: ("tcp", 4), 0x12: ("udp", 4), 0x21: ("tcp", 16), 0x22: ("udp", 16),
}
_V2_ADDRESSES = {4: struct.Struct("!4s4sHH"), 16: struct.Struct("!16s16sHH")}


class ProxyError(ValueError):
    """A malformed or unsupported PROXY header: close that connection."""


@dataclass(frozen=True)
class ProxyHeader:
    """The original connection; ``source`` is None for LOCAL/UNKNOWN
    (a health check from the proxy itself: use the real peer address)."""

    protocol: str | None = None  # "tcp" or "udp"
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def _check_address(host: str) -> ipaddress._BaseAddress:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` (v1 carries TCP only)."""
    src, dst = _check_address(source[0]), _check_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int], destination: tuple[str, int], protocol: str = "tcp") -> bytes:
    """A binary v2 PROXY header for a TCP connection or a UDP datagram."""
    src, dst = _check_address(source[0]), _check_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    if protocol not in ("tcp", "udp"):
        raise ValueError("protocol must be tcp or udp")
    family = (0x10 if src.version == 4 else 0x20) | (0x01 if protocol == "tcp" else 0x02)
    size = 4 if src.version == 4 else 16
    body = _V2_ADDRESSES[size].pack(src.packed, dst.packed, source[1], destination[1])
    return V2_HEADER.pack(V2_SIGNATURE, 0x21, family, len(body)) + body


def encode_v2_local() -> bytes:
    """v2 LOCAL: the connection is the proxy's own (no address follows)."""
    return V2_HEADER.pack(V2_SIGNATURE, 0x20, 0x00, 0)


def parse(data: bytes, max_v2: int = V2_MAX_DEFAULT) -> tuple[ProxyHeader, int] | None:
    """``(header, bytes consumed)``, or ``None`` if more bytes are needed.

    Raises :class:`ProxyError` as soon as the bytes cannot be a valid
    header (so a peer cannot make the caller wait on garbage).
    """
    if not data:
        return None
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data, max_v2)
    raise ProxyError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
        raise ProxyError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("PROXY v1 line too long or not CRLF-terminated")
        return None
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return ProxyHeader(), end + 2
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    addresses = []
    for host in parts[2:4]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ProxyError("malformed PROXY v1 address") from None
        if address.version != version:
            raise ProxyError("PROXY v1 address does not match its family")
        if version == 4 and str(address) != host:
            raise ProxyError("PROXY v1 IPv4 address not in dotted-quad form")
        addresses.append(str(address))
    ports = []
    for port in parts[4:6]:
        if not port.isdigit() or (len(port) > 1 and port[0] == "0") or not 0 <= int(port) <= 65535:
            raise ProxyError("malformed PROXY v1 port")
        ports.append(int(port))
    return ProxyHeader("tcp", (addresses[0], ports[0]), (addresses[1], ports[1])), end + 2


def _parse_v2(data: bytes, max_v2: int) -> tuple[ProxyHeader, int] | None:
    head = data[:V2_HEADER.size]
    if not V2_SIGNATURE.startswith(head[:len(V2_SIGNATURE)]):
        raise ProxyError("no PROXY protocol header")
    if len(head) < V2_HEADER.size:
        return None
    _, ver_cmd, family, length = V2_HEADER.unpack(head)
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F not in (0, 1):
        raise ProxyError("unsupported PROXY v2 version or command")
    total = V2_HEADER.size + length
    if total > max_v2:
        raise ProxyError(f"PROXY v2 header of {total} bytes exceeds {max_v2}")
    if ver_cmd & 0x0F == 0:  # LOCAL: addresses (if any) are to be ignored
        if len(data) < total:
            return None
        return ProxyHeader(), total
    if family == 0x00:  # UNSPEC with PROXY: nothing usable, like v1 UNKNOWN
        if len(data) < total:
            return None
        return ProxyHeader(), total
    if family not in _V2_FAMILIES:
        raise ProxyError(f"unsupported PROXY v2 address family 0x{family:02x}")
    protocol, size = _V2_FAMILIES[family]
    addresses = _V2_ADDRESSES[size]
    if length < addresses.size:
        raise ProxyError("PROXY v2 address block too short")
    if len(data) < total:
        return None
    src, dst, sport, dport = addresses.unpack_from(data, V2_HEADER.size)
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    return ProxyHeader(protocol, (str(make(src)), sport), (str(make(dst)), dport)), total
