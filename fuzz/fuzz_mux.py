"""Coverage-guided fuzzing of the multiplexed carrier's frame handling.

    .venv/bin/python fuzz/fuzz_mux.py acceptor -max_total_time=120
    .venv/bin/python fuzz/fuzz_mux.py opener   -max_total_time=120
    .venv/bin/python fuzz/fuzz_mux.py headers  -max_total_time=60

``acceptor``: a :class:`~tunnelpass.carriers.muxconn.MuxConnection` on the
side that accepts streams (the HTTP/2 server, which dials for each one),
``opener``: the side that opens them (the HTTP/2 client, with two streams
of its own open), each on a RelayTransport with a Clock, fed the peer's
valid preface and SETTINGS and then the fuzzer's frames (structured: type,
flags, stream id, payload -- or, one input in four, raw bytes), in slices,
the clock moving between them.  ``headers``: ``muxheaders.decode_open`` on
arbitrary header lists.  The documented outcomes are the only ones: the
carrier goes on, or is closed (GOAWAY / abort) with its streams ended; a
stream is refused (RST_STREAM); ``decode_open`` returns a known kind and
well-formed addresses or raises StreamRefused.  Anything else -- an
exception out of ``dataReceived``, a stream left behind after the
connection ended -- is a crash.
"""

import struct
import sys

import atheris

with atheris.instrument_imports(include=["tunnelpass"]):
    from tunnelpass.carriers.muxconn import MuxConnection
    from tunnelpass.carriers.muxheaders import StreamRefused, decode_open
    from tunnelpass.carriers.stream import KINDS

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from tests.helpers import RelayTransport

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream_id) + payload


SETTINGS, SETTINGS_ACK = frame(4, 0, 0), frame(4, 1, 0)


class _Acceptor:
    def stream_accepted(self, kind, addresses, stream, data):
        assert kind in KINDS, kind
        stream.attach(Protocol(), data)
        return True


def _frames(provider) -> bytes:
    if provider.ConsumeIntInRange(0, 3) == 0:
        return provider.ConsumeBytes(4096)
    out = []
    for _ in range(provider.ConsumeIntInRange(1, 24)):
        kind = provider.ConsumeIntInRange(0, 11)  # the RFC's types, ALTSVC, one unknown
        flags = provider.ConsumeIntInRange(0, 255)
        stream_id = provider.ConsumeIntInRange(0, 9)
        out.append(frame(kind, flags, stream_id, provider.ConsumeBytes(provider.ConsumeIntInRange(0, 64))))
    return b"".join(out)


def _run(data: bytes, opener: bool) -> None:
    provider = atheris.FuzzedDataProvider(data)
    step = provider.ConsumeIntInRange(1, 512)
    clock = Clock()
    lost = []
    mux = MuxConnection(opener, None if opener else _Acceptor(), clock, 1.0,
                        on_lost=lambda conn, why: lost.append(why), name="carrier fuzz")
    transport = RelayTransport()
    mux.makeConnection(transport)
    ours = []
    if opener:
        mux.dataReceived(SETTINGS + SETTINGS_ACK)
        for kind in KINDS:
            stream = mux.open_stream(kind, (("192.0.2.1", 1), ("192.0.2.2", 2)))
            stream.attach(Protocol())
            ours.append(stream)
    else:
        mux.dataReceived(PREFACE + SETTINGS + SETTINGS_ACK)
    payload = _frames(provider)
    for cut in range(0, len(payload), step):
        if transport.disconnecting or transport.disconnected:
            break  # closed: a transport stops reading
        mux.dataReceived(payload[cut:cut + step])
        clock.advance(0.5)
    if ours and not (transport.disconnecting or transport.disconnected):
        for stream in ours:
            stream.write(b"x" * 100)  # what the users send, whatever state the peer left the stream in
            stream.loseConnection()
    mux.connectionLost(None)
    assert len(lost) == 1, lost
    assert not mux.streams, mux.streams
    assert all(not stream.connected for stream in ours)


def fuzz_acceptor(data: bytes) -> None:
    _run(data, opener=False)


def fuzz_opener(data: bytes) -> None:
    _run(data, opener=True)


def fuzz_headers(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    names = [b":method", b":protocol", b"tp-addr", b":status", b"TP-ADDR"]
    fields = []
    for _ in range(provider.ConsumeIntInRange(0, 5)):
        pick = provider.ConsumeIntInRange(0, len(names))
        name = names[pick] if pick < len(names) else provider.ConsumeBytes(8)
        fields.append((name, provider.ConsumeBytes(provider.ConsumeIntInRange(0, 140))))
    try:
        kind, addresses = decode_open(fields)
    except StreamRefused:
        return
    assert kind in KINDS
    if addresses is not None:
        (src, sport), (dst, dport) = addresses
        assert isinstance(src, str) and isinstance(dst, str) and "%" not in src + dst
        assert 0 <= sport <= 65535 and 0 <= dport <= 65535


TARGETS = {"acceptor": fuzz_acceptor, "opener": fuzz_opener, "headers": fuzz_headers}

if __name__ == "__main__":
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()
