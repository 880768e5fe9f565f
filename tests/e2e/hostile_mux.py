"""A hostile peer of the multiplexed carrier (``--type 3``) with the session
key: an insider, the worst case.  It authenticates with the project's own
sans-IO classes (:class:`~tunnelpass.wire.handshake.ClientHandshake` on a
control connection, ``pool_auth_frame(..., Type.MUX_AUTH)`` and
:func:`~tunnelpass.wire.handshake.check_mux_ok` on each carrier) and then
writes whatever HTTP/2 bytes a test wants, raw or built with ``h2``.
Blocking sockets, run from the test's own thread."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from tests.e2e.harness import ThreadedListener
from tests.e2e.tunnel_harness import KEY
from tunnelpass.wire.codec import FrameDecoder, Type
from tunnelpass.wire.handshake import ClientHandshake, check_mux_ok, pool_auth_frame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HTTP/2 frame types and codes (RFC 9113)
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 1, 3, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
OPEN_TCP = [(b":method", b"CONNECT"), (b":protocol", b"tcp")]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One raw HTTP/2 frame (no check of anything: that is the point)."""
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream_id) + payload


def parse_frames(data: bytes) -> list:
    """``(type, flags, stream_id, payload)`` of each whole frame in *data*."""
    frames, at = [], 0
    while len(data) - at >= 9:
        length = int.from_bytes(data[at:at + 3], "big")
        if len(data) - at - 9 < length:
            break
        kind, flags = data[at + 3], data[at + 4]
        stream_id = int.from_bytes(data[at + 5:at + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream_id, data[at + 9:at + 9 + length]))
        at += 9 + length
    return frames


def goaway_code(data: bytes):
    """The error code of the GOAWAY in *data*, or None."""
    for kind, _, _, payload in parse_frames(data):
        if kind == GOAWAY and len(payload) >= 8:
            return int.from_bytes(payload[4:8], "big")
    return None


def resets(data: bytes) -> dict:
    """``{stream_id: code}`` of the RST_STREAM frames in *data*."""
    return {sid: int.from_bytes(payload[:4], "big") for kind, _, sid, payload in parse_frames(data)
            if kind == RST_STREAM and len(payload) == 4}


def h2_peer(client_side: bool, window: int | None = None) -> H2Connection:
    """An ``h2`` connection configured as tunnelpass's own (no header
    validation: the CONNECT with ``:protocol`` is ours)."""
    config = H2Configuration(client_side=client_side, header_encoding=None, validate_outbound_headers=False,
                             normalize_outbound_headers=False, validate_inbound_headers=False,
                             normalize_inbound_headers=False)
    conn = H2Connection(config)
    conn.initiate_connection()
    if window is not None:
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
    return conn


class Insider:
    """A session of the tunnel at ``127.0.0.1:port`` opened with the key."""

    def __init__(self, port: int, tls: int = 0):
        self.port, self.tls = port, tls
        self.counter = 0
        self.control, fingerprint = self.connect()
        handshake = ClientHandshake(KEY.encode(), fingerprint)
        self.control.sendall(handshake.start())
        decoder = FrameDecoder()
        while handshake.session is None:
            data = self.control.recv(65536)
            if not data:
                raise ConnectionError("the server closed the control connection")
            for item in decoder.feed(data):
                for reply in handshake.receive(item):
                    self.control.sendall(reply)
        self.session = handshake.session

    def connect(self, rcvbuf: int | None = None):
        """A socket to the tunnel port (TLS with ALPN h2 at tls > 0) and the
        fingerprint of the certificate it sees."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        if not self.tls:
            return sock, b""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(sock)
        return sock, hashlib.sha256(sock.getpeercert(binary_form=True)).digest()

    def close(self) -> None:
        self.control.close()

    def auth_frame(self, fingerprint: bytes, frame_type=Type.MUX_AUTH, counter: int | None = None) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        return pool_auth_frame(self.session, counter, os.urandom(16), fingerprint, frame_type)

    def carrier(self, rcvbuf: int | None = None) -> "Carrier":
        """An authenticated carrier connection, before any HTTP/2 byte of ours."""
        sock, fingerprint = self.connect(rcvbuf)
        auth = self.auth_frame(fingerprint)
        sock.sendall(auth)
        decoder = FrameDecoder(allowed=frozenset({Type.MUX_OK, Type.ERROR}))
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the carrier before MUX_OK")
            frames = decoder.feed(data, max_frames=1)
            if frames:
                check_mux_ok(self.session, auth, fingerprint, frames[0])
                return Carrier(sock, decoder.take_rest())


class Carrier:
    """One carrier connection after MUX_OK: raw bytes both ways."""

    def __init__(self, sock, rest: bytes = b""):
        self.sock = sock
        self.received = bytearray(rest)

    def send(self, data: bytes) -> bool:
        """Write *data*; False if the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_until_closed(self, timeout: float = 10.0) -> bytes:
        """Everything the server sends until it closes the connection (or
        resets it); AssertionError if it is still open after *timeout*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, ssl.SSLError, OSError):
                return bytes(self.received)
            if not data:
                return bytes(self.received)
            self.received += data
        raise AssertionError(f"the server kept the carrier open for {timeout} s; it sent "
                             f"{[f[:3] for f in parse_frames(bytes(self.received))][-10:]}")

    def read_for(self, seconds: float) -> bool:
        """Read for *seconds*; whether the connection is still open."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return False
            if not data:
                return False
            self.received += data
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def stream_echo(carrier, conn, payload: bytes, timeout: float = 10.0) -> bytes:
    """One stream opened with *conn*'s HTTP/2 state on *carrier*, carrying
    *payload*: what comes back within *timeout* (the target echoes)."""
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, OPEN_TCP)
    conn.send_data(stream_id, payload)
    carrier.send(conn.data_to_send())
    echoed, deadline = b"", time.monotonic() + timeout
    while len(echoed) < len(payload) and time.monotonic() < deadline:
        carrier.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = carrier.sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        for event in conn.receive_data(data):
            if type(event).__name__ == "DataReceived" and event.stream_id == stream_id:
                echoed += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        carrier.send(conn.data_to_send())
    return echoed


def echo_through(insider: Insider, payload: bytes = b"well-behaved", timeout: float = 10.0) -> bytes:
    """Open a fresh carrier, speak HTTP/2 as tunnelpass does, open one TCP
    stream and return what comes back for *payload* (the server's target
    is an echo server), then close the carrier."""
    carrier = insider.carrier()
    conn = h2_peer(client_side=True)
    try:
        conn.receive_data(bytes(carrier.received))
        return stream_echo(carrier, conn, payload, timeout)
    finally:
        carrier.close()


class Backend:
    """The server's ``--target`` in the send flow: echoes, and counts the
    connections it accepted (each is a dial the server made for a stream).
    A connection whose first bytes are ``STALL`` stops reading (a target
    that stalls, so the server stops acknowledging that stream's DATA);
    ``SOURCE`` makes it send without end (a stream the peer will not read)."""

    def __init__(self, testcase):
        self.accepted = 0
        # A small receive buffer: a stall shows up soon.
        self.listening = ThreadedListener(testcase, self._serve, self._accepted, backlog=1024, rcvbuf=8192,
                                          keep=True)
        self.port = self.listening.port

    def _accepted(self, sock) -> None:
        self.accepted += 1

    @staticmethod
    def _serve(sock) -> None:
        try:
            first = sock.recv(65536)
            if first.startswith(b"STALL"):
                time.sleep(60)
                return
            if first.startswith(b"SOURCE"):
                chunk = b"s" * 65536
                while True:
                    sock.sendall(chunk)
            data = first
            while data:
                sock.sendall(data)
                data = sock.recv(65536)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.listening.close()


def serve_one(insider: Insider, entry: int, payload: bytes = b"well-behaved", timeout: float = 10.0) -> bytes:
    """The receive flow, well-behaved: a fresh carrier answers as tunnelpass's
    client does (the HTTP/2 server), a user connects to the server's entry
    port and sends *payload*; the carrier echoes each stream's bytes back.
    What the user reads back."""
    carrier = insider.carrier()
    conn = h2_peer(client_side=False)
    conn.receive_data(bytes(carrier.received))
    carrier.send(conn.data_to_send())
    user = socket.create_connection(("127.0.0.1", entry), timeout=timeout)
    try:
        user.sendall(payload)
        deadline = time.monotonic() + timeout
        echoed = b""
        carrier.sock.settimeout(0.05)
        user.settimeout(0.05)
        while len(echoed) < len(payload) and time.monotonic() < deadline:
            try:
                data = carrier.sock.recv(65536)
            except socket.timeout:
                data = None
            if data == b"":
                break
            for event in conn.receive_data(data or b""):
                name = type(event).__name__
                if name == "RequestReceived":
                    conn.send_headers(event.stream_id, [(b":status", b"200")])
                elif name == "DataReceived":
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    conn.send_data(event.stream_id, event.data)
            carrier.send(conn.data_to_send())
            try:
                echoed += user.recv(65536)
            except socket.timeout:
                pass
        return echoed
    finally:
        user.close()
        carrier.close()
