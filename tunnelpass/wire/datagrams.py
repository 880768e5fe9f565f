# -*- test-case-name: tests.test_datagrams -*-
"""Sans-IO framing of UDP datagrams over a tunnel stream.

After OPEN_UDP a pool connection carries datagrams, each as a 16-bit
big-endian length and that many bytes.  The prefix keeps datagram
boundaries across the byte stream: a datagram is never merged with another
or split, and any datagram UDP can carry (up to 65,535 bytes of payload
buffer; 65,507 is IPv4's real maximum) fits.  Every length is valid, so
there is no malformed input -- only an incomplete last frame, which the
decoder holds (at most 65,536 bytes) until the rest arrives.
"""

from __future__ import annotations

import struct

LENGTH = struct.Struct("!H")
MAX_DATAGRAM = 0xFFFF


def frame(datagram: bytes) -> bytes:
    """One datagram as it travels on the stream."""
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return LENGTH.pack(len(datagram)) + datagram


class DatagramDecoder:
    """Feed stream bytes as they arrive; get back whole datagrams, in order."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else bytes(data)
        size = len(buffer)
        datagrams = []
        position = 0
        while size - position >= 2:
            end = position + 2 + ((buffer[position] << 8) | buffer[position + 1])
            if end > size:
                break
            datagrams.append(buffer[position + 2:end])
            position = end
        self._buffer = buffer[position:] if position else buffer
        return datagrams

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (at most 2 + 65,535 - 1)."""
        return len(self._buffer)
