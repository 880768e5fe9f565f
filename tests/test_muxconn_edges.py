"""Edges of the multiplexed carrier found in review: the ends of a
connection (GOAWAY either way, the last stream id), users that reset
before sending, and what a retiring connection still owes its streams."""

from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.test_muxconn import Recorder, Wire, V4
from tests import test_mux_hostile as hostile
from tests.test_mux_hostile import frame, OPEN, HEADERS, RST_STREAM, END_HEADERS
from tunnelpass.carriers import muxconn
from tunnelpass.carriers.muxopener import CarrierSet


class CarrierEdgeTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, name):
        return [e for e in self.events if e.get("event") == name]

    def test_retire_goaway_truncates_a_complete_stream_the_peer_still_holds(self):
        """The acceptor retires (drain); its last stream completes; the
        opener's user reads slowly, so the opener's stream holds the last
        bytes and END_STREAM.  The GOAWAY must not turn that complete
        stream into a reset with its tail dropped."""
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        stream.pauseProducing()  # the user's socket is full (LegProducer pauses the stream)
        wire.b.retire()
        b_stream.write(b"the tail of a download")
        b_stream.loseWriteConnection()
        stream.loseWriteConnection()  # the user's FIN
        wire.pump()
        # the relay on b: both directions ended -> loseConnection -> last stream gone -> GOAWAY
        self.assertTrue(b_recorder.read_ended)
        b_stream.loseConnection()
        wire.pump()
        stream.resumeProducing()  # the user reads again
        self.assertEqual(recorder.received, b"the tail of a download")
        self.assertTrue(recorder.reason is None or recorder.reason.check(ConnectionDone), recorder.reason)

    def test_stream_ids_run_out(self):
        """After 2**30 streams a carrier can open no more; it must stop
        being picked (and be replaced), not raise into the user's accept."""
        wire = Wire()
        wire.a.h2.highest_outbound_stream_id = 2**31 - 1
        carriers = CarrierSet(wire.clock, 5.0)
        carriers.add(wire.a)
        self.assertFalse(wire.a.usable, "a carrier without stream ids left is still 'usable'")

    def test_stream_ids_run_out_users_wait_for_another_carrier(self):
        """A user arriving when the only carrier has no ids left waits for
        the next carrier (nothing raises into the user's accept), and is
        served on it."""
        wire = Wire()
        wire.a.h2.highest_outbound_stream_id = 2**31 - 1
        carriers = CarrierSet(wire.clock, 5.0)
        carriers.add(wire.a)
        d = carriers.open("tcp", V4)
        self.assertNoResult(d)
        fresh = Wire(clock=wire.clock)
        carriers.add(fresh.a)
        self.assertIs(self.successResultOf(d).connection, fresh.a)

    def test_a_carrier_nearly_out_of_ids_retires(self):
        wire = Wire()
        wire.a.h2.highest_outbound_stream_id = 2**31 - 1 - 2 * muxconn.IDS_RESERVE
        stream = wire.a.open_stream("tcp", V4)
        stream.attach(Recorder())
        self.assertTrue(wire.a.retiring)
        wire.pump()
        stream.abortConnection()
        wire.pump()
        self.assertTrue(wire.a.closed)  # its last stream ended: closed, and the client dials a fresh one

    def test_ping_after_our_goaway_is_not_a_protocol_error(self):
        """retire() sent GOAWAY; the peer's heartbeat PING crossing it is
        no breach of HTTP/2."""
        wire = Wire()
        wire.a.retire()  # no streams: GOAWAY now (a's bytes not delivered yet)
        wire.b.h2.ping(b"12345678")  # b's heartbeat, already on the way
        wire.b._flush()
        wire.pump()
        self.assertEqual(self.logged("carrier_protocol_error"), [])

    def test_headers_behind_the_last_reset_of_a_retiring_acceptor(self):
        """A retiring acceptor whose last stream is reset and a new stream
        opened in the same read: nothing may escape dataReceived."""
        peer = hostile.HostilePeerTests("test_more_streams_than_announced")
        peer.setUp()
        peer.mux.dataReceived(frame(HEADERS, END_HEADERS, 1, OPEN))
        self.assertEqual(len(peer.mux.streams), 1)
        peer.mux.retire()
        import struct
        peer.mux.dataReceived(frame(RST_STREAM, 0, 1, struct.pack("!I", 8)) + frame(HEADERS, END_HEADERS, 3, OPEN))

    def test_write_between_the_peers_goaway_and_the_close(self):
        """After the peer's GOAWAY the carrier closes once its buffer is out;
        a relay writing to a stream meanwhile must not get h2's ProtocolError."""
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()
        wire.a.h2.close_connection()
        wire.b.dataReceived(wire.a.h2.data_to_send())  # the GOAWAY
        self.assertFalse(wire.b.closed)  # loseConnection waits for the write buffer
        b_stream.write(b"the target's next bytes")  # raises h2.exceptions.ProtocolError today

    def test_users_that_connect_and_reset_kill_every_stream_of_the_carrier(self):
        """Public users doing connect + RST (a connect scan, impatient
        clients) make the honest opener reset streams before any DATA; past
        the rapid-reset budget the acceptor closes the whole carrier and a
        long-running stream of another user is reset."""
        self.patch(muxconn, "RESET_BURST", 50)
        wire = Wire()
        stream, recorder, b_stream, b_recorder = wire.open()  # a long download of another user
        b_stream.write(b"x" * 1000)
        wire.pump()
        for _ in range(60):  # each: the user connected, the stream opened, the user reset
            s = wire.a.open_stream("tcp", V4)
            s.attach(Recorder())
            s.abortConnection()
        wire.pump()
        self.assertIsNone(recorder.reason, "another user's stream was reset by the carrier's close")


class CarrierDialTests(unittest.TestCase):
    """The client's carrier dial: one deadline over TLS and MUX_OK, and a
    count of dials that belongs to one session."""

    def client(self):
        from types import SimpleNamespace

        from twisted.internet.task import Clock
        from twisted.logger import Logger

        from tunnelpass.carriers.muxopener import CarrierSet
        from tunnelpass.tunnel.muxdial import CarrierKeeping
        from tunnelpass.wire.handshake import Session, SessionConfig

        class Client(CarrierKeeping):
            log = Logger()
            running = True

            def __init__(self):
                self.clock = Clock()
                self.settings = SimpleNamespace(handshake_timeout=5.0)
                self.session = Session(b"s" * 16, b"k" * 32, SessionConfig(carrier=3))
                self.carriers = CarrierSet(self.clock, 5.0)
                self.dials = []

            def _dial_carrier(self):  # the dial itself is the reactor's; count what fill asks for
                self.dials.append(self.session)
                self.carriers_dialing += 1

        return Client()

    def test_a_silent_server_does_not_hold_a_dial(self):
        from tests.helpers import RelayTransport
        from tunnelpass.tunnel.muxdial import CarrierDial

        client = self.client()
        failed = []
        client.carrier_failed = lambda reason, session: failed.append(session)
        dial = CarrierDial(client, client.session, 1)
        transport = RelayTransport()
        dial.makeConnection(transport)
        self.assertTrue(transport.value())  # MUX_AUTH sent
        client.clock.advance(5.0)
        self.assertTrue(transport.disconnected)  # aborted at the deadline: its loss counts as a failed dial

    def test_dials_of_an_ended_session_do_not_count(self):
        client = self.client()
        client.fill_carriers()
        self.assertEqual(client.carriers_dialing, 2)
        old = client.session
        client.session = object()  # the session ended while both dials hang; a new one starts
        client.fill_carriers()
        self.assertEqual(client.dials.count(client.session), 2)
        client.carrier_failed(None, old)  # the old dials end late: the new count is untouched
        self.assertEqual(client.carriers_dialing, 2)

