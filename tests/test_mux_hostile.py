"""A hostile HTTP/2 peer against one MuxConnection, at unit speed: raw
frames into a carrier on a RelayTransport with a Clock (the e2e side is
tests/e2e/test_mux_hostile_e2e.py; the fuzz target fuzz/fuzz_mux.py).
Each bound here is one that a test over real sockets cannot reach in a
few seconds, or a fuzz finding kept as a regression."""

import struct

import hpack
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.carriers import muxconn
from tunnelpass.carriers.muxconn import RESET_RATE, MuxConnection

from tests.helpers import RelayTransport

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, DATA = 1, 3, 4, 6, 7, 0
END_HEADERS = 0x4
OPEN = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":protocol", b"tcp")])


def frame(kind, flags, stream_id, payload=b""):
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream_id) + payload


def goaway_code(data: bytes):
    at = 0
    while len(data) - at >= 9:
        length = int.from_bytes(data[at:at + 3], "big")
        if data[at + 3] == GOAWAY:
            return int.from_bytes(data[at + 13:at + 17], "big")
        at += 9 + length
    return None


class Acceptor:
    """Accepts every stream with a plain Protocol (a target being dialled)."""

    def __init__(self):
        self.accepted = 0

    def stream_accepted(self, kind, addresses, stream, data):
        self.accepted += 1
        stream.attach(Protocol(), data)
        return True


class HostilePeerTests(unittest.TestCase):
    """The acceptor side (the HTTP/2 server: it dials for each stream)
    facing raw frames from an insider.  The bounds are made small here
    (the same code, at unit speed)."""

    def setUp(self):
        self.patch(muxconn, "RESET_BURST", 50)
        self.patch(muxconn, "MAX_UNREAD", 64 * 1024)
        self.patch(muxconn, "MAX_STREAMS", 40)
        self.clock = Clock()
        self.acceptor = Acceptor()
        self.lost = []
        self.mux = MuxConnection(False, self.acceptor, self.clock, 0.0, lambda conn, why: self.lost.append(why),
                                 name="carrier hostile0")
        self.transport = RelayTransport()
        self.mux.makeConnection(self.transport)
        self.mux.dataReceived(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0))  # and our SETTINGS acked
        self.transport.clear()

    def test_rapid_reset_is_refused_not_dialled(self):
        """Streams opened and reset before any DATA, faster than the budget
        allows (CVE-2023-44487): past the budget new streams are refused
        (RST_STREAM(REFUSED_STREAM), never handed to the acceptor, so no
        target is dialled), the carrier and its other streams stay up, and
        streams are accepted again once the rate falls."""
        burst = b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, OPEN) + frame(RST_STREAM, 0, 1 + 2 * i, b"\0\0\0\x08")
                         for i in range(muxconn.RESET_BURST + 50))
        self.mux.dataReceived(burst)
        self.assertFalse(self.transport.disconnected, "the carrier was dropped")
        self.assertEqual(self.acceptor.accepted, muxconn.RESET_BURST)
        self.assertEqual(self.mux.refused, 50)
        sid = 1 + 2 * (muxconn.RESET_BURST + 50)
        self.clock.advance(1.0)  # the budget refills
        self.mux.dataReceived(frame(HEADERS, END_HEADERS, sid, OPEN))
        self.assertEqual(self.acceptor.accepted, muxconn.RESET_BURST + 1)

    def test_resets_within_the_rate_and_after_data_are_allowed(self):
        """Early resets at the refill rate, and any number of resets of
        streams that carried DATA, keep the carrier up."""
        sid = 1
        for _ in range(3 * muxconn.RESET_BURST):  # with data: never counted
            self.mux.dataReceived(frame(HEADERS, END_HEADERS, sid, OPEN) + frame(DATA, 0, sid, b"x")
                                  + frame(RST_STREAM, 0, sid, b"\0\0\0\x08"))
            sid += 2
        for _ in range(3 * muxconn.RESET_BURST):  # early, but no faster than the rate
            self.clock.advance(1 / RESET_RATE)
            self.mux.dataReceived(frame(HEADERS, END_HEADERS, sid, OPEN) + frame(RST_STREAM, 0, sid, b"\0\0\0\x08"))
            sid += 2
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(self.lost, [])

    def test_ping_flood_while_the_peer_does_not_read(self):
        """While the carrier's buffer is full (the transport paused it: the
        peer does not read), the acks a PING flood asks for are bounded:
        past MAX_UNREAD bytes the carrier is dropped, not buffered on."""
        self.mux.pauseProducing()  # what the transport does once its buffer is full
        ping = frame(PING, 0, 0, b"12345678")
        for _ in range(100):  # 170 kB of PINGs
            if self.transport.disconnected:
                break
            self.mux.dataReceived(ping * 100)
        self.assertTrue(self.transport.disconnected, "acks buffered without bound")
        self.assertLess(len(self.transport.value()), muxconn.MAX_UNREAD + 2 * len(ping) * 100)

    def test_ping_acks_bounded_only_while_paused(self):
        """A peer that reads may ping as it likes: the count starts again
        each time the carrier drains."""
        ping = frame(PING, 0, 0, b"12345678") * 100
        for _ in range(100):
            self.mux.pauseProducing()
            self.mux.dataReceived(ping)
            self.transport.clear()
            self.mux.resumeProducing()
        self.assertFalse(self.transport.disconnected)

    def test_more_streams_than_announced(self):
        """The stream past MAX_STREAMS concurrent ones is a protocol error:
        the carrier ends (its streams with it), the acceptor never sees it."""
        count = muxconn.MAX_STREAMS
        self.mux.dataReceived(b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, OPEN) for i in range(count)))
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(len(self.mux.streams), muxconn.MAX_STREAMS)
        self.mux.dataReceived(frame(HEADERS, END_HEADERS, 1 + 2 * muxconn.MAX_STREAMS, OPEN))
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.acceptor.accepted, muxconn.MAX_STREAMS)


class FuzzFindingTests(unittest.TestCase):
    """Crashes fuzz/fuzz_mux.py found, kept as regressions."""

    def test_heartbeat_after_the_peers_goaway(self):
        """The peer's GOAWAY closes h2; if the close does not finish (the
        peer does not read what is buffered) the next heartbeat must not
        raise from h2.ping -- it aborts the connection instead (before,
        the error killed the heartbeat and the connection stayed forever)."""
        clock = Clock()
        mux = MuxConnection(False, Acceptor(), clock, 1.0, name="carrier fuzz0001")
        transport = RelayTransport()
        mux.makeConnection(transport)
        mux.dataReceived(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0) + frame(GOAWAY, 0, 0, bytes(8)))
        self.assertTrue(transport.disconnecting)
        clock.advance(1.0)
        self.assertTrue(transport.disconnected, "the lingering carrier was not aborted")
