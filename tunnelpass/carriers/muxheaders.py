# -*- test-case-name: tests.test_muxheaders -*-
"""What a multiplexed stream says when it opens (sans-IO).

A stream of the HTTP/2 carrier (``--type 3``) opens with one HEADERS frame
from the side that listens for users::

    :method    CONNECT
    :protocol  tcp | udp
    tp-addr    SOURCE-IP SOURCE-PORT DESTINATION-IP DESTINATION-PORT   (optional)

``:protocol`` is the stream's kind (what the pool carrier's OPEN and
OPEN_UDP frames say); ``tp-addr`` the user's addresses, for
``--proxy-protocol`` on the dialling side (absent when unknown, e.g. a
UNIX socket user).  The answer is ``:status 200`` before the first byte
the dialling side sends back.  Nothing else is accepted: an unknown name,
a repeated name, a value over :data:`MAX_VALUE` bytes, a malformed address
or an unknown kind makes :func:`decode_open` raise :class:`StreamRefused`,
and the carrier refuses that one stream.  Header names are compared as
bytes: HTTP/2 requires them in lower case, so ``TP-ADDR`` is unknown.
"""

from __future__ import annotations

import socket

from hpack import Encoder
from hpack.hpack import encode_integer

from tunnelpass.carriers.stream import KINDS

#: Longest header value accepted (an IPv6 address pair fits with room).
MAX_VALUE = 128
METHOD, PROTOCOL, ADDRESSES, STATUS = b":method", b":protocol", b"tp-addr", b":status"
OK = [(STATUS, b"200")]
_KIND_VALUES = {kind.encode(): kind for kind in KINDS}
_REQUIRED = {METHOD: b"CONNECT"}


class StreamRefused(Exception):
    """The opening HEADERS of a stream are not what this protocol sends."""


def encode_open(kind: str, addresses=None) -> list:
    """The header list opening a stream of *kind* for the user at
    *addresses* (``(source, destination)`` pairs of ``(host, port)``, or None)."""
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}")
    headers = [(METHOD, b"CONNECT"), (PROTOCOL, kind.encode())]
    text = _format_addresses(addresses)
    if text is not None:
        headers.append((ADDRESSES, text))
    return headers


def _format_addresses(addresses):
    if addresses is None:
        return None
    (src_host, src_port), (dst_host, dst_port) = addresses
    if not isinstance(src_host, str) or not isinstance(dst_host, str):
        return None  # not IP (a UNIX socket user): unknown
    # an IPv6 scope id (fe80::1%eth0) names an interface of this host only
    src, dst = _ip(src_host.split("%", 1)[0]), _ip(dst_host.split("%", 1)[0])
    if src is None or dst is None:
        return None
    return f"{src[1]} {int(src_port)} {dst[1]} {int(dst_port)}".encode()


def _ip(text: str):
    """``(family, canonical text)`` of an IP literal, or None (the C parser:
    a stream opens for every user connection)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_ntop(family, socket.inet_pton(family, text))
        except (OSError, ValueError, UnicodeError):
            continue
    return None


def decode_open(headers) -> tuple:
    """``(kind, addresses or None)`` from a stream's opening header list;
    :class:`StreamRefused` for anything this protocol does not send."""
    seen = {}
    for name, value in headers:
        if name in seen:
            raise StreamRefused(f"header {_show(name)} repeated")
        if name not in (METHOD, PROTOCOL, ADDRESSES):
            raise StreamRefused(f"unknown header {_show(name)}")
        if len(value) > MAX_VALUE:
            raise StreamRefused(f"header {_show(name)} is over {MAX_VALUE} bytes")
        seen[name] = value
    if seen.get(METHOD) != b"CONNECT":
        raise StreamRefused("a stream must open with :method CONNECT")
    kind = _KIND_VALUES.get(seen.get(PROTOCOL))
    if kind is None:
        raise StreamRefused(f"unknown stream kind {_show(seen.get(PROTOCOL, b''))}")
    raw = seen.get(ADDRESSES)
    return kind, (None if raw is None else _parse_addresses(raw))


def _parse_addresses(raw: bytes):
    parts = raw.split(b" ")
    if b"%" in raw:  # a scope id: any bytes but a space (CR LF into a PROXY v1 line), and local to the sender
        raise StreamRefused("tp-addr has a malformed IP address")
    if len(parts) != 4:
        raise StreamRefused("tp-addr must be SOURCE-IP SOURCE-PORT DESTINATION-IP DESTINATION-PORT")
    try:
        src, dst = (_ip(part.decode("ascii")) for part in (parts[0], parts[2]))
    except UnicodeDecodeError:
        src = dst = None
    if src is None or dst is None:
        raise StreamRefused("tp-addr has a malformed IP address")
    ports = []
    for part in (parts[1], parts[3]):
        if not part.isdigit() or len(part) > 5 or int(part) > 65535:
            raise StreamRefused("tp-addr has a malformed port")
        ports.append(int(part))
    if src[0] != dst[0]:
        raise StreamRefused("tp-addr mixes IPv4 and IPv6")
    return (src[1], ports[0]), (dst[1], ports[1])


def _literal(name: bytes, value: bytes) -> bytes:
    """One header field as HPACK's "literal without indexing, new name"
    (RFC 7541, section 6.2.2), both strings without Huffman coding."""
    return (b"\x00" + bytes(encode_integer(len(name), 7)) + name
            + bytes(encode_integer(len(value), 7)) + value)


_CONSTANT = {(name, value): _literal(name, value)
             for name, value in [(METHOD, b"CONNECT"), *OK, *((PROTOCOL, kind.encode()) for kind in KINDS)]}


class LiteralEncoder(Encoder):
    """HPACK for a carrier connection: every field a literal, never added
    to the dynamic table, never Huffman-coded.

    Every stream opens with the same two fields and one that differs each
    time (the user's addresses), so the dynamic table would only churn:
    hpack's indexing and Huffman coding were a large part of a stream's
    cost on both sides, for a few bytes saved.  Any HPACK decoder reads
    this; after the peer resized the table, the next block goes through
    hpack's own encoder, which announces the new size as RFC 7541 requires."""

    def encode(self, headers, huffman: bool = True) -> bytes:
        if self.header_table.resized:
            return super().encode(headers, huffman)
        constant = _CONSTANT
        return b"".join(constant.get(field) or _literal(*field) for field in headers)


def _show(raw: bytes) -> str:
    """A peer's bytes for a log line: printable ASCII only, cut short."""
    text = raw[:40].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))
