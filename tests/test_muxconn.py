"""Tests for tunnelpass.carriers.muxconn and muxstream: two MuxConnections
joined in memory (StringTransports pumped by hand, a Clock injected).

``iosim.FakeTransport`` neither provides ``IStream`` nor pauses producers,
so each side's carrier is a :class:`tests.helpers.RelayTransport` and the
test moves the bytes itself: it decides when the carrier is full (the
connection's ``pauseProducing``), silent (bytes not delivered) or cut."""

import struct

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tunnelpass.carriers import muxconn
from tunnelpass.carriers.muxconn import DEAD_AFTER, MAX_FRAME, STREAM_WINDOW, MuxConnection
from tunnelpass.carriers.muxstream import CANCEL, HIGH_WATER, REFUSED_STREAM, MuxStream
from tunnelpass.carriers.stream import IStream

from tests.helpers import RelayTransport

V4 = (("192.0.2.1", 40000), ("198.51.100.7", 443))


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A stream's user: records what the stream tells it."""

    def __init__(self):
        self.chunks = []
        self.read_ended = self.write_ended = False
        self.reason = None

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data):
        self.chunks.append(data)

    def readConnectionLost(self):
        self.read_ended = True

    def writeConnectionLost(self):
        self.write_ended = True

    def connectionLost(self, reason):
        self.reason = reason


@implementer(IPushProducer)
class Producer:
    """The other leg of a relay, registered on a stream."""

    def __init__(self):
        self.paused = self.stopped = False
        self.pauses = self.resumes = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        self.resumes += 1

    def stopProducing(self):
        self.stopped = True


class Acceptor:
    """The dialling side's IStreamAcceptor: attaches a Recorder, or refuses."""

    def __init__(self, accept=True):
        self.accept = accept
        self.accepted = []  # (kind, addresses, stream, recorder)

    def stream_accepted(self, kind, addresses, stream, data):
        if not self.accept:
            stream.abortConnection()
            return False
        recorder = Recorder()
        stream.attach(recorder, data)
        self.accepted.append((kind, addresses, stream, recorder))
        return True


class Wire:
    """An opener (the HTTP/2 client, ``a``) and an acceptor side (``b``)
    on two RelayTransports; :meth:`pump` carries bytes both ways."""

    def __init__(self, heartbeat=0.0, accept=True, clock=None):
        self.clock = clock or Clock()
        self.acceptor = Acceptor(accept)
        self.ended = []  # (connection, reason) from on_lost
        on_lost = lambda conn, why: self.ended.append((conn, why))  # noqa: E731
        self.a = MuxConnection(True, None, self.clock, heartbeat, on_lost, name="carrier aaaaaaaa")
        self.b = MuxConnection(False, self.acceptor, self.clock, heartbeat, on_lost, name="carrier bbbbbbbb")
        self.ta, self.tb = RelayTransport(), RelayTransport()
        self.a.makeConnection(self.ta)
        self.b.makeConnection(self.tb)
        self.pump()

    def pump(self, a_to_b=True, b_to_a=True):
        """Carry bytes until both sides are quiet; then, as a socket would,
        end both connections once one side closed (an abort drops what it
        had buffered and ends both abnormally)."""
        for _ in range(10_000):
            moved = False
            for transport, peer, allowed in ((self.ta, self.b, a_to_b), (self.tb, self.a, b_to_a)):
                if transport.disconnected:  # aborted: what it held never leaves
                    transport.clear()
                    self.cut(ConnectionLost("connection aborted"))
                    return
                data = transport.value()
                if data and allowed and not peer.closed:
                    transport.clear()
                    peer.dataReceived(data)
                    moved = True
            if not moved:
                break
        else:
            raise AssertionError("the two sides never went quiet")
        if self.ta.disconnecting or self.tb.disconnecting:
            self.cut(ConnectionDone())

    def cut(self, reason):
        for conn in (self.a, self.b):
            if not conn.closed:
                conn.connectionLost(Failure(reason))

    def open(self, kind="tcp", addresses=V4):
        """A stream opened on ``a`` with a Recorder on each end:
        ``(a_stream, a_recorder, b_stream, b_recorder)``."""
        stream = self.a.open_stream(kind, addresses)
        recorder = Recorder()
        stream.attach(recorder)
        self.pump()
        _, _, b_stream, b_recorder = self.acceptor.accepted[-1]
        return stream, recorder, b_stream, b_recorder


class StreamTests(unittest.TestCase):
    def test_open_announces_kind_and_addresses(self):
        wire = Wire()
        stream, _, b_stream, _ = wire.open("udp", V4)
        self.assertEqual([(k, a) for k, a, _, _ in wire.acceptor.accepted], [("udp", V4)])
        self.assertTrue(IStream.providedBy(stream))
        self.assertIsInstance(b_stream, MuxStream)
        self.assertEqual((stream.stream_id, b_stream.stream_id), (1, 1))
        self.assertEqual((wire.a.opened, wire.b.opened, len(wire.a.streams), len(wire.b.streams)), (1, 1, 1, 1))
        self.assertIsNone(stream.native_end())
        self.assertEqual(wire.ended, [])

    def test_data_both_ways(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        big = bytes(range(256)) * 1024  # 256 KiB: the whole window, in several frames
        stream.write(b"hello ")
        stream.writeSequence([b"wor", b"ld"])
        b_stream.write(big)
        wire.pump()
        self.assertEqual(b_recorder.received, b"hello world")
        self.assertEqual(recorder.received, big)
        stream.write(big)  # the window came back: another window's worth goes through
        wire.pump()
        self.assertEqual(b_recorder.received, b"hello world" + big)
        self.assertEqual((stream.unsent(), b_stream.unsent()), (0, 0))

    def test_half_close_from_the_opener(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        stream.write(b"request")
        stream.loseWriteConnection()
        self.assertTrue(recorder.write_ended)
        wire.pump()
        self.assertEqual(b_recorder.received, b"request")
        self.assertTrue(b_recorder.read_ended)
        self.assertFalse(recorder.read_ended)
        stream.write(b"ignored after the half-close")
        b_stream.write(b"response")  # the other direction goes on
        wire.pump()
        self.assertEqual(recorder.received, b"response")
        self.assertEqual(b_recorder.received, b"request")
        b_stream.loseWriteConnection()
        self.assertTrue(b_recorder.write_ended)
        wire.pump()
        self.assertTrue(recorder.read_ended)
        self.assertIsNone(recorder.reason)
        # both directions ended: each user closes (as the relay does), cleanly and with no reset
        stream.loseConnection()
        b_stream.loseConnection()
        wire.pump()
        self.assertTrue(recorder.reason.check(ConnectionDone))
        self.assertTrue(b_recorder.reason.check(ConnectionDone))
        self.assertEqual((wire.a.streams, wire.b.streams), ({}, {}))

    def test_half_close_from_the_acceptor_before_any_data(self):
        """The dialling side's END_STREAM first carries ``:status 200``."""
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        b_stream.loseWriteConnection()
        wire.pump()
        self.assertTrue(recorder.read_ended)
        self.assertTrue(stream.connected)
        stream.write(b"still flowing")
        wire.pump()
        self.assertEqual(b_recorder.received, b"still flowing")

    def test_half_close_waits_for_the_queue(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        data = b"q" * (STREAM_WINDOW + 1000)
        stream.write(data)
        stream.loseWriteConnection()
        self.assertFalse(recorder.write_ended, "END_STREAM before 1000 queued bytes")
        wire.pump()
        self.assertEqual(b_recorder.received, data)
        self.assertTrue(recorder.write_ended)
        self.assertTrue(b_recorder.read_ended)

    def test_abort_is_seen_as_abnormal_by_the_peer(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        stream.write(b"partial")
        stream.abortConnection()
        self.assertTrue(recorder.reason.check(ConnectionAborted))
        wire.pump()
        self.assertEqual(b_recorder.received, b"partial")
        self.assertTrue(b_recorder.reason.check(ConnectionLost))
        self.assertFalse(b_recorder.reason.check(ConnectionDone))
        self.assertIn(f"code {CANCEL}", b_recorder.reason.getErrorMessage())
        self.assertEqual((wire.a.streams, wire.b.streams), ({}, {}))
        self.assertFalse(wire.a.closed or wire.b.closed, "one stream's end is not the carrier's")

    def test_abort_from_the_acceptor(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        b_stream.abortConnection()
        wire.pump()
        self.assertTrue(recorder.reason.check(ConnectionLost))
        self.assertFalse(recorder.reason.check(ConnectionDone))

    def test_lose_connection_with_the_peer_still_sending(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        stream.write(b"last words")
        stream.loseConnection()
        self.assertTrue(recorder.reason.check(ConnectionDone))
        wire.pump()
        self.assertEqual(b_recorder.received, b"last words")
        self.assertTrue(b_recorder.read_ended)  # the END_STREAM came first, with the data
        # then the reset, as a closed TCP socket answers late data
        self.assertTrue(b_recorder.reason.check(ConnectionLost))
        b_stream.write(b"too late")
        wire.pump()
        self.assertEqual(recorder.received, b"")
        self.assertEqual((wire.a.streams, wire.b.streams), ({}, {}))

    def test_lose_connection_after_the_peer_ended_is_clean(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        b_stream.write(b"all of it")
        b_stream.loseWriteConnection()
        wire.pump()
        stream.loseConnection()
        wire.pump()
        self.assertTrue(recorder.reason.check(ConnectionDone))
        self.assertTrue(b_recorder.read_ended)
        self.assertIsNone(b_recorder.reason, "no reset when the peer had nothing more to send")

    def test_many_streams_are_independent(self):
        wire = Wire()
        pairs = [wire.open() for _ in range(5)]
        self.assertEqual([p[0].stream_id for p in pairs], [1, 3, 5, 7, 9])
        for i, (stream, _, b_stream, _) in enumerate(pairs):
            stream.write(b"a%d" % i)
            b_stream.write(b"b%d" % i)
        pairs[2][0].abortConnection()
        wire.pump()
        for i, (_, recorder, _, b_recorder) in enumerate(pairs):
            self.assertEqual(b_recorder.received, b"a%d" % i)
            if i != 2:
                self.assertEqual(recorder.received, b"b%d" % i)
                self.assertIsNone(b_recorder.reason)
        self.assertEqual(len(wire.b.streams), 4)


class FlowControlTests(unittest.TestCase):
    def test_a_paused_stream_stops_only_itself(self):
        wire = Wire()
        stream, _, b_stream, b_recorder = wire.open()
        other, _, b_other, b_other_recorder = wire.open()
        producer = Producer()
        stream.registerProducer(producer, True)
        b_stream.pauseProducing()  # the dialled target is slow: the relay pauses this stream
        sent = b"".join(bytes([i]) * 4096 for i in range(100))  # 400 KiB, more than a window
        for start in range(0, len(sent), 16384):
            stream.write(sent[start:start + 16384])
            wire.pump()
        # nothing was acknowledged: the sender used its whole window and queues the rest
        self.assertEqual(wire.a.h2.local_flow_control_window(stream.stream_id), 0)
        self.assertEqual(stream.unsent(), len(sent) - STREAM_WINDOW)
        self.assertEqual(b_recorder.received, b"")
        self.assertGreater(stream.unsent(), HIGH_WATER)
        self.assertTrue(producer.paused)
        self.assertTrue(stream.consumer_paused())
        self.assertEqual(producer.pauses, 1)
        # another stream on the same carrier keeps flowing, both ways, beyond a window
        bulk = b"o" * (3 * STREAM_WINDOW)
        other.write(bulk)
        b_other.write(bulk)
        wire.pump()
        self.assertEqual(b_other_recorder.received, bulk)
        self.assertEqual(other.protocol.received, bulk)
        # the slow target catches up: everything arrives, in order, and the producer resumes
        b_stream.resumeProducing()
        wire.pump()
        self.assertEqual(b_recorder.received, sent)
        self.assertEqual(stream.unsent(), 0)
        self.assertFalse(producer.paused)
        self.assertEqual(producer.resumes, 1)
        self.assertFalse(stream.consumer_paused())

    def test_paused_streams_never_stall_the_others(self):
        """More slow streams than the connection's window holds windows of:
        a fresh stream still flows (each paused stream's own window bounds
        what it holds; the connection's goes back at once).  The window is
        made 1 MiB here so that five streams fill it, not sixty-five."""
        self.patch(muxconn, "CONNECTION_WINDOW", 4 * STREAM_WINDOW)
        wire = Wire()
        slow = [wire.open() for _ in range(5)]
        for stream, _, b_stream, _ in slow:
            b_stream.pauseProducing()
            stream.write(b"s" * STREAM_WINDOW)
            wire.pump()
        self.assertEqual([s.unsent() for s, _, _, _ in slow], [0] * 5)
        fresh, _, b_fresh, b_fresh_recorder = wire.open()
        fresh.write(b"f" * STREAM_WINDOW)
        wire.pump()
        self.assertEqual(b_fresh_recorder.received, b"f" * STREAM_WINDOW)
        # the held data is not acknowledged twice: after all resume, the
        # connection's window is whole again and no larger
        for _, _, b_stream, b_recorder in slow:
            b_stream.resumeProducing()
            self.assertEqual(b_recorder.received, b"s" * STREAM_WINDOW)
        wire.pump()
        self.assertLessEqual(wire.a.h2.outbound_flow_control_window, 4 * STREAM_WINDOW)
        for stream, _, _, b_recorder in slow:
            stream.write(b"t" * STREAM_WINDOW)
        wire.pump()
        self.assertEqual([r.received[-STREAM_WINDOW:] for _, _, _, r in slow], [b"t" * STREAM_WINDOW] * 5)

    def test_what_paused_streams_hold_is_bounded_per_connection(self):
        """The connection's window goes back early only while the paused
        streams hold less than HELD_LIMIT: beyond, their data counts
        against the connection window again, so one connection's memory
        stays bounded however many streams stall."""
        self.patch(muxconn, "CONNECTION_WINDOW", 4 * STREAM_WINDOW)
        self.patch(muxconn, "HELD_LIMIT", 2 * STREAM_WINDOW)
        wire = Wire()
        slow = [wire.open() for _ in range(3)]
        for stream, _, b_stream, _ in slow:
            b_stream.pauseProducing()
            stream.write(b"s" * STREAM_WINDOW)
            wire.pump()
        self.assertEqual(wire.b.held, 2 * STREAM_WINDOW)
        # the third stream's window of data was not handed back early
        self.assertEqual(wire.a.h2.outbound_flow_control_window, 3 * STREAM_WINDOW)
        for _, _, b_stream, b_recorder in slow:
            b_stream.resumeProducing()
            self.assertEqual(b_recorder.received, b"s" * STREAM_WINDOW)
        self.assertEqual(wire.b.held, 0)
        wire.pump()
        self.assertLessEqual(wire.a.h2.outbound_flow_control_window, 4 * STREAM_WINDOW)

    def test_one_window_update_per_batch_for_what_paused_streams_hold(self):
        """Small frames (a UDP stream's datagrams) on a paused stream: the
        connection's window goes back in one WINDOW_UPDATE per batch read,
        not one per frame (which a busy peer would not read fast enough)."""
        from hyperframe.frame import Frame, WindowUpdateFrame

        wire = Wire()
        stream, _, b_stream, _ = wire.open()
        b_stream.pauseProducing()
        for _ in range(100):
            stream.write(b"d" * 100)
        batch = wire.ta.value()
        wire.ta.clear()
        wire.b.dataReceived(batch)
        sent, updates = memoryview(wire.tb.value()), 0
        while sent:
            frame, length = Frame.parse_frame_header(sent[:9])
            if isinstance(frame, WindowUpdateFrame) and frame.stream_id == 0:
                updates += 1
            sent = sent[9 + length:]
        self.assertEqual(updates, 1)
        self.assertEqual(wire.b.held, 100 * 100)

    def test_a_stream_that_ends_paused_gives_back_what_it_held(self):
        self.patch(muxconn, "CONNECTION_WINDOW", 4 * STREAM_WINDOW)
        wire = Wire()
        stream, _, b_stream, _ = wire.open()
        b_stream.pauseProducing()
        stream.write(b"s" * STREAM_WINDOW)
        wire.pump()
        self.assertEqual(wire.b.held, STREAM_WINDOW)
        b_stream.abortConnection()
        wire.pump()
        self.assertEqual(wire.b.held, 0)

    def test_producer_resumes_only_below_half_the_high_water(self):
        wire = Wire()
        stream, _, b_stream, b_recorder = wire.open()
        producer = Producer()
        stream.registerProducer(producer, True)
        b_stream.pauseProducing()
        stream.write(b"x" * (STREAM_WINDOW + HIGH_WATER + 1))
        wire.pump()
        self.assertTrue(producer.paused)
        # the receiver takes a little: less than HIGH_WATER / 2 frees up
        b_stream.resumeProducing()
        b_stream.pauseProducing()
        self.assertTrue(producer.paused)

    def test_data_held_while_paused_is_delivered_before_the_end(self):
        wire = Wire()
        stream, recorder, b_stream, _ = wire.open()
        stream.pauseProducing()
        b_stream.write(b"held")
        b_stream.loseWriteConnection()
        wire.pump()
        self.assertEqual(recorder.received, b"")
        self.assertFalse(recorder.read_ended)
        stream.resumeProducing()
        self.assertEqual(recorder.received, b"held")
        self.assertTrue(recorder.read_ended)

    def test_a_producer_registered_on_a_full_stream_is_paused_by_the_next_write(self):
        """As on a Twisted TCP transport: registering does not pause, the
        next write over the mark does."""
        wire = Wire()
        stream, _, b_stream, _ = wire.open()
        b_stream.pauseProducing()
        stream.write(b"x" * (STREAM_WINDOW + HIGH_WATER + 1))
        producer = Producer()
        stream.registerProducer(producer, True)
        stream.write(b"y")
        self.assertTrue(producer.paused)
        stream.unregisterProducer()
        self.assertFalse(stream.consumer_paused())

    def test_a_full_carrier_queues_every_stream_and_serves_them_in_turn(self):
        wire = Wire()
        pairs = [wire.open() for _ in range(3)]
        wire.a.pauseProducing()  # the carrier's socket buffer is full
        for i, (stream, _, _, _) in enumerate(pairs):
            stream.write(bytes([65 + i]) * 1000)
        wire.pump()
        self.assertEqual([p[3].received for p in pairs], [b""] * 3)
        self.assertEqual([p[0].unsent() for p in pairs], [1000] * 3)
        wire.a.resumeProducing()
        wire.pump()
        self.assertEqual([p[3].received for p in pairs], [bytes([65 + i]) * 1000 for i in range(3)])

    def test_the_peers_reset_stops_a_registered_producer(self):
        wire = Wire()
        stream, recorder, b_stream, _ = wire.open()
        producer = Producer()
        stream.registerProducer(producer, True)
        b_stream.abortConnection()
        wire.pump()
        self.assertTrue(producer.stopped)
        self.assertTrue(recorder.reason.check(ConnectionLost))


class RefusalTests(unittest.TestCase):
    def send_raw_headers(self, wire, headers):
        """The opener sends *headers* as a new stream (a broken or hostile peer)."""
        a = wire.a
        stream_id = a.h2.get_next_available_stream_id()
        a.h2.send_headers(stream_id, headers)
        stream = a.streams[stream_id] = MuxStream(a, stream_id, opener=True)
        recorder = Recorder()
        stream.attach(recorder)
        a._flush()
        wire.pump()
        return recorder

    def test_bad_headers_refuse_that_stream_only(self):
        wire = Wire()
        good, good_recorder, b_good, b_good_recorder = wire.open()
        for headers in ([(b":method", b"GET"), (b":protocol", b"tcp")],
                        [(b":method", b"CONNECT"), (b":protocol", b"sctp")],
                        [(b":method", b"CONNECT"), (b":protocol", b"tcp"), (b"x-other", b"1")],
                        [(b":method", b"CONNECT"), (b":protocol", b"tcp"), (b"tp-addr", b"1.2.3.4 1 ::1 2")]):
            recorder = self.send_raw_headers(wire, headers)
            self.assertTrue(recorder.reason.check(ConnectionLost), headers)
            self.assertIn(f"code {REFUSED_STREAM}", recorder.reason.getErrorMessage())
        self.assertEqual(wire.b.refused, 4)
        self.assertEqual(len(wire.acceptor.accepted), 1)
        self.assertEqual(len(wire.b.streams), 1)
        good.write(b"unharmed")
        wire.pump()
        self.assertEqual(b_good_recorder.received, b"unharmed")
        self.assertFalse(wire.a.closed or wire.b.closed)

    def test_acceptor_refusing(self):
        wire = Wire(accept=False)
        stream = wire.a.open_stream("tcp", V4)
        recorder = Recorder()
        stream.attach(recorder)
        wire.pump()
        self.assertTrue(recorder.reason.check(ConnectionLost))
        self.assertEqual((wire.b.refused, wire.b.opened), (1, 1))
        self.assertEqual((wire.a.streams, wire.b.streams), ({}, {}))

    def test_retiring_acceptor_refuses_new_streams(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        wire.b.retire()
        late = wire.a.open_stream("tcp")
        late_recorder = Recorder()
        late.attach(late_recorder)
        wire.pump()
        self.assertIn(f"code {REFUSED_STREAM}", late_recorder.reason.getErrorMessage())
        self.assertEqual(wire.b.refused, 1)
        stream.write(b"the old one goes on")
        wire.pump()
        self.assertEqual(b_recorder.received, b"the old one goes on")


class RetireTests(unittest.TestCase):
    def test_retire_closes_after_the_last_stream(self):
        wire = Wire()
        self.assertTrue(wire.a.usable)
        stream, recorder, b_stream, b_recorder = wire.open()
        wire.a.retire()
        self.assertFalse(wire.a.usable)
        self.assertFalse(wire.a.closed)
        stream.write(b"finishing")
        b_stream.write(b"too")
        wire.pump()
        self.assertEqual((b_recorder.received, recorder.received), (b"finishing", b"too"))
        stream.loseWriteConnection()
        b_stream.loseWriteConnection()
        wire.pump()
        self.assertFalse(wire.ta.disconnecting)
        stream.loseConnection()
        b_stream.loseConnection()
        wire.pump()
        self.assertTrue(wire.a.closed and wire.b.closed)
        self.assertEqual({conn for conn, _ in wire.ended}, {wire.a, wire.b})
        self.assertTrue(all(why.check(ConnectionDone) for _, why in wire.ended))

    def test_retire_without_streams_closes_now(self):
        wire = Wire()
        wire.a.retire()
        wire.pump()
        self.assertTrue(wire.a.closed and wire.b.closed)
        self.assertEqual(len(wire.ended), 2)


def pings_sent(transport) -> int:
    """PING frames (not acks) in what *transport* holds."""
    data, count = transport.value(), 0
    while len(data) >= 9:
        length, kind, flags = struct.unpack("!IBB", b"\0" + data[:5])[0], data[3], data[4]
        count += kind == 6 and not flags & 1
        data = data[9 + length:]
    return count


class HeartbeatTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, event):
        return [e for e in self.events if e.get("event") == event]

    def test_ping_acks_set_rtt(self):
        wire = Wire(heartbeat=1.0)
        self.assertIsNone(wire.a.rtt)
        wire.clock.advance(1.0)
        self.assertEqual(pings_sent(wire.ta), 1)
        wire.clock.advance(0.25)  # the round trip
        wire.pump()
        self.assertAlmostEqual(wire.a.rtt, 0.25)
        self.assertAlmostEqual(wire.b.rtt, 0.25)

    def test_a_silent_peer_is_dead_after_three_heartbeats(self):
        wire = Wire(heartbeat=1.0)
        pairs = [wire.open() for _ in range(2)]
        for _ in range(DEAD_AFTER):
            wire.clock.advance(1.0)
            wire.pump(b_to_a=False)  # a's pings reach b; b's answers never reach a
        self.assertFalse(wire.ta.disconnected)
        self.assertEqual(self.logged("carrier_dead"), [])
        wire.clock.advance(1.0)
        self.assertTrue(wire.ta.disconnected)
        (dead,) = self.logged("carrier_dead")
        self.assertEqual((dead["name"], dead["count"]), ("carrier aaaaaaaa", 2))
        wire.a.connectionLost(Failure(ConnectionAborted()))  # the reactor, after the abort
        for stream, recorder, _, _ in pairs:
            self.assertTrue(recorder.reason.check(ConnectionLost))
            self.assertIn("carrier connection lost", recorder.reason.getErrorMessage())
        self.assertEqual(wire.a.streams, {})
        self.assertEqual([conn for conn, _ in wire.ended], [wire.a])

    def test_an_answering_peer_stays_alive(self):
        wire = Wire(heartbeat=1.0)
        for _ in range(10):
            wire.clock.advance(1.0)
            wire.pump()
        self.assertFalse(wire.a.closed or wire.b.closed)
        self.assertEqual(self.logged("carrier_dead"), [])

    def test_no_heartbeat_after_the_end(self):
        wire = Wire(heartbeat=1.0)
        wire.a.close()
        wire.pump()
        self.assertTrue(wire.a.closed and wire.b.closed)
        self.assertEqual(wire.clock.getDelayedCalls(), [])


class PeerMisbehaviourTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_a_protocol_error_closes_only_that_connection(self):
        clock = Clock()
        broken, healthy = Wire(clock=clock), Wire(clock=clock)
        _, recorder, _, b_recorder = broken.open()
        stream, _, _, healthy_recorder = healthy.open()
        # WINDOW_UPDATE with a zero increment on the connection: a protocol error (RFC 9113 6.9)
        broken.ta.write(struct.pack("!I", 4)[1:] + b"\x08\x00" + b"\0\0\0\0" + b"\0\0\0\0")
        broken.pump()
        (event,) = [e for e in self.events if e.get("event") == "carrier_protocol_error"]
        self.assertEqual(event["name"], "carrier bbbbbbbb")
        self.assertTrue(broken.a.closed and broken.b.closed)
        self.assertTrue(recorder.reason.check(ConnectionLost))
        self.assertTrue(b_recorder.reason.check(ConnectionLost))
        stream.write(b"unaffected")
        healthy.pump()
        self.assertEqual(healthy_recorder.received, b"unaffected")
        self.assertFalse(healthy.a.closed or healthy.b.closed)

    def test_a_frame_over_max_frame_is_a_protocol_error(self):
        wire = Wire()
        stream, _, _, _ = wire.open()
        size = MAX_FRAME + 1
        wire.ta.write(struct.pack("!I", size)[1:] + b"\x00\x00" + struct.pack("!I", stream.stream_id) + b"x" * size)
        wire.pump()
        self.assertTrue(wire.a.closed and wire.b.closed)
        self.assertTrue([e for e in self.events if e.get("event") == "carrier_protocol_error"])

    def test_a_frame_of_max_frame_is_accepted(self):
        wire = Wire()
        stream, _, _, b_recorder = wire.open()
        size = MAX_FRAME
        wire.ta.write(struct.pack("!I", size)[1:] + b"\x00\x00" + struct.pack("!I", stream.stream_id) + b"x" * size)
        wire.pump()
        self.assertFalse(wire.a.closed or wire.b.closed)
        self.assertEqual(b_recorder.received, b"x" * size)

    def test_goaway_from_the_peer_ends_the_carrier(self):
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        wire.b.close(2)  # INTERNAL_ERROR
        wire.pump()
        (event,) = [e for e in self.events if e.get("event") == "carrier_goaway"]
        self.assertEqual((event["name"], event["code"]), ("carrier aaaaaaaa", 2))
        self.assertTrue(wire.a.closed and wire.b.closed)
        self.assertFalse(wire.a.usable)
        for r in (recorder, b_recorder):
            self.assertTrue(r.reason.check(ConnectionLost))
        self.assertEqual(len(wire.ended), 2)

    def test_a_clean_goaway_is_not_logged_as_a_warning(self):
        wire = Wire()
        wire.b.close()
        wire.pump()
        self.assertTrue(wire.a.closed)
        self.assertEqual([e for e in self.events if e.get("event") == "carrier_goaway"], [])

    def test_the_acceptor_side_opening_a_stream_is_a_violation(self):
        wire = Wire()
        # b (the HTTP/2 server) sends HEADERS on a new even stream id, as if it were a client
        from hpack import Encoder
        block = Encoder().encode([(b":method", b"CONNECT"), (b":protocol", b"tcp")])
        wire.tb.write(struct.pack("!I", len(block))[1:] + b"\x01\x04" + struct.pack("!I", 2) + block)
        wire.pump()
        self.assertTrue(wire.a.closed)
        self.assertTrue([e for e in self.events if e.get("event") == "carrier_protocol_error"])


class StreamCountTests(unittest.TestCase):
    """h2 counts open streams by scanning them all; the carrier's h2 does
    the scan only when its cheap bound could matter (amortized O(1))."""

    def test_opening_many_streams_scans_rarely(self):
        from h2.connection import H2Connection

        scans = []
        original = H2Connection._open_streams

        def counting(self_, remainder):
            scans.append(len(self_.streams))
            return original(self_, remainder)

        self.patch(H2Connection, "_open_streams", counting)
        wire = Wire()
        for _ in range(1000):
            wire.a.open_stream("tcp", V4).attach(Recorder())
        wire.pump()
        self.assertEqual(len(wire.acceptor.accepted), 1000)
        # both sides scanned a few times (each time the table doubled), not once per stream
        self.assertLess(len(scans), 20)
        self.assertEqual(wire.a.h2.open_outbound_streams, 1000)

    def test_the_limit_is_exact(self):
        """Near the limit the count is exact: a peer's 11th stream over a
        limit of 10 is refused even though the table holds closed ones."""
        self.patch(muxconn, "MAX_STREAMS", 10)
        wire = Wire()
        streams = [wire.open() for _ in range(10)]
        for stream, _, b_stream, _ in streams[:5]:
            stream.abortConnection()
        wire.pump()
        self.assertEqual(wire.b.h2.open_inbound_streams, 5)
        more = [wire.open() for _ in range(5)]  # closed ones do not count: 10 open again
        self.assertFalse(wire.b.closed)
        self.assertEqual(len(wire.b.streams), 10)
        self.assertEqual(len(more), 5)

    def test_a_burst_that_ended_leaves_no_state_behind(self):
        wire = Wire()
        opened = [wire.open() for _ in range(300)]
        for stream, _, b_stream, _ in opened:
            stream.loseConnection()
            b_stream.loseConnection()
        wire.pump()
        self.assertEqual((len(wire.a.streams), len(wire.b.streams)), (0, 0))
        self.assertLess(len(wire.a.h2.streams), 128)
        self.assertLess(len(wire.b.h2.streams), 128)


class FirstFlightTests(unittest.TestCase):
    """Our SETTINGS hold from the start: a peer may use them as soon as it
    has read them, in the same flight as its ACK."""

    def test_more_than_h2s_default_100_streams_in_the_first_flight(self):
        clock, acceptor = Clock(), Acceptor()
        a = MuxConnection(True, None, clock, 0.0, name="carrier aaaaaaaa")
        b = MuxConnection(False, acceptor, clock, 0.0, name="carrier bbbbbbbb")
        ta, tb = RelayTransport(), RelayTransport()
        a.makeConnection(ta)
        b.makeConnection(tb)
        # Users were waiting: the opener opens their streams at once, before
        # the acceptor's SETTINGS (or anything) came back; its preface,
        # SETTINGS and 150 HEADERS arrive in one read.
        for _ in range(150):
            a.open_stream("tcp", V4).attach(Recorder())
        b.dataReceived(ta.value())
        self.assertFalse(b.closed)
        self.assertEqual(len(acceptor.accepted), 150)

