"""Coverage-guided fuzzing of every parser that reads untrusted bytes.

    make fuzz                       # 60 s per target
    .venv/bin/python fuzz/fuzz_parsers.py rules -max_total_time=600

Targets: ``rules`` (the forwarder's rules file), ``frames`` (the tunnel's
frame decoder), ``handshake`` (server handshake fed decoded frames),
``url`` and ``token`` (NodePass-style URLs and connection tokens),
``key`` (the weak-key rule),
``gate`` (the server's tunnel port: whatever a peer sends first, in any
slicing, with a live session to attack).  Any
exception other than the parser's own error type is a bug.
"""

import sys

import atheris

with atheris.instrument_imports():
    from tunnelpass.wire.codec import FrameDecoder, ProtocolError
    from tunnelpass.wire.handshake import HandshakeError, ServerHandshake, SessionConfig
    from tunnelpass.config.rules import RulesError, parse_rules
    from tunnelpass.config.urls import check_key, key_weakness, parse_token, parse_url
    from tunnelpass.tunnel.gate import _GateFactory
    from tunnelpass.tunnel.server import ServerSettings, TunnelServer

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport


def fuzz_rules(data: bytes) -> None:
    try:
        parse_rules(data, "fuzz")
    except RulesError:
        pass


def fuzz_frames(data: bytes) -> None:
    decoder = FrameDecoder()
    try:
        for cut in range(0, len(data), 7):  # sliced, as reads arrive
            decoder.feed(data[cut:cut + 7])
            assert decoder.buffered < 300, decoder.buffered
    except ProtocolError:
        pass


def fuzz_handshake(data: bytes) -> None:
    server = ServerHandshake(b"fuzz-handshake-key-7Qm2xZ9pL4vW8rT", b"", SessionConfig())
    try:
        for frame in FrameDecoder().feed(data):
            server.receive(frame)
    except (ProtocolError, HandshakeError):
        pass
    assert server.session is None, "authenticated without the key"


def fuzz_url(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(4096)
    try:
        parse_url(text)
    except ValueError:
        pass


def fuzz_token(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(2048)
    try:
        parse_token("tp1." + text)
    except ValueError:
        pass


def fuzz_key(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(300)
    weakness = key_weakness(text)
    assert weakness is None or isinstance(weakness, str)
    try:
        check_key(text)
    except ValueError:
        return
    assert weakness is None, "a weak key passed the check"


def _gate_server():
    settings = ServerSettings(tunnel_host="127.0.0.1", tunnel_port=0, target_host="127.0.0.1",
                              target_port=0, key="fuzz-key-0123456789abcdef")
    server = TunnelServer(settings, MemoryReactorClock())
    server.session_config = SessionConfig()
    server.target_factory = None
    return server


def fuzz_gate(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    step = provider.ConsumeIntInRange(1, 64)
    payload = provider.ConsumeBytes(1024)
    server = _gate_server()
    protocol = _GateFactory(server).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1))
    protocol.makeConnection(transport)
    for cut in range(0, len(payload), step):
        if transport.disconnecting:
            break
        protocol.dataReceived(payload[cut:cut + step])
    protocol.connectionLost(None)
    assert server.guard.pending == 0, "a closed connection still counts as pending"
    assert server.session is None, "authenticated without the key"


TARGETS = {"rules": fuzz_rules, "frames": fuzz_frames, "handshake": fuzz_handshake,
           "url": fuzz_url, "token": fuzz_token, "key": fuzz_key, "gate": fuzz_gate}

if __name__ == "__main__":
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()
