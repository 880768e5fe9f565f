"""tunnelpass.carriers.opener: the listening side's stream opener over the idle pool."""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.poolfakes import PoolMember
from tunnelpass.wire.codec import FrameDecoder, Type, decode_open
from tunnelpass.carriers.opener import PoolOpener
from tunnelpass.carriers.stream import write_now
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.carriers.stream import TCP, UDP, IStreamOpener, StreamUnavailable

USER = (("198.51.100.7", 4321), ("127.0.0.1", 8080))
ID_A, ID_B = b"a" * 16, b"b" * 16


def open_frame(member):
    (frame,) = FrameDecoder().feed(member.transport.value(), max_frames=1)
    return frame.type, decode_open(frame.payload)


class PoolOpenerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.asked = []
        self.pool = IdlePool(self.clock, 4, self.asked.append, timeout=5.0, max_waiters=2)
        self.claimed = []
        self.opener = PoolOpener(lambda: self.pool, "no client is connected", on_claim=self.claimed.append)

    def test_provides_the_interface(self):
        verifyObject(IStreamOpener, self.opener)

    def test_idle_connection_is_announced_with_open_and_the_users_addresses(self):
        member = PoolMember()
        self.pool.add(ID_A, member)
        stream = self.successResultOf(self.opener.open(TCP, USER))
        self.assertIs(stream, member.transport)
        self.assertEqual(open_frame(member), (Type.OPEN, (ID_A, USER)))
        self.assertEqual(self.claimed, [ID_A])
        self.assertEqual(self.pool.idle, {})

    def test_udp_is_announced_with_open_udp(self):
        member = PoolMember()
        self.pool.add(ID_A, member)
        self.successResultOf(self.opener.open(UDP, USER))
        self.assertEqual(open_frame(member), (Type.OPEN_UDP, (ID_A, USER)))

    def test_no_addresses(self):
        member = PoolMember()
        self.pool.add(ID_A, member)
        self.successResultOf(self.opener.open(TCP))
        self.assertEqual(open_frame(member), (Type.OPEN, (ID_A, None)))

    def test_unknown_kind_is_a_bug(self):
        self.assertRaises(ValueError, self.opener.open, "sctp", USER)

    def test_waits_for_a_connection(self):
        d = self.opener.open(TCP, USER)
        self.assertNoResult(d)
        self.assertEqual(self.asked, [1], "a waiting user asks for one more")
        member = PoolMember()
        self.pool.add(ID_A, member)
        self.assertIs(self.successResultOf(d), member.transport)
        self.assertEqual(open_frame(member)[0], Type.OPEN)

    def test_timeout_is_stream_unavailable(self):
        d = self.opener.open(TCP, USER)
        self.clock.advance(5.0)
        failure = self.failureResultOf(d, StreamUnavailable)
        self.assertIn("no pool connection within 5.0s", failure.getErrorMessage())

    def test_too_many_waiting_is_stream_unavailable(self):
        self.opener.open(TCP, USER), self.opener.open(TCP, USER)
        failure = self.failureResultOf(self.opener.open(TCP, USER), StreamUnavailable)
        self.assertIn("already wait", failure.getErrorMessage())

    def test_no_pool_is_stream_unavailable(self):
        self.pool = None
        failure = self.failureResultOf(self.opener.open(UDP, USER), StreamUnavailable)
        self.assertEqual(failure.getErrorMessage(), "no client is connected")

    def test_skips_a_connection_that_closed_while_idle(self):
        closed, live = PoolMember(), PoolMember()
        self.pool.add(ID_A, closed)
        self.pool.add(ID_B, live)
        closed.transport.loseConnection()  # its removal is underway
        stream = self.successResultOf(self.opener.open(TCP, USER))
        self.assertIs(stream, live.transport)
        self.assertEqual(closed.transport.value(), b"", "nothing written to the closed one")
        self.assertEqual(self.claimed, [ID_B])

    def test_skipping_a_closed_one_then_waiting_can_be_cancelled(self):
        closed = PoolMember()
        self.pool.add(ID_A, closed)
        closed.transport.loseConnection()
        d = self.opener.open(TCP, USER)
        self.assertNoResult(d)  # waits for the next one
        d.cancel()
        self.failureResultOf(d, CancelledError)
        member = PoolMember()
        self.pool.add(ID_B, member)
        self.assertEqual(list(self.pool.idle), [ID_B], "the cancelled wait took nothing")
        self.assertEqual(member.claims, 0)

    def test_user_hangs_up_while_waiting(self):
        d = self.opener.open(TCP, USER)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.pool.waiters), 0)
        member = PoolMember()
        self.pool.add(ID_A, member)
        self.assertEqual(list(self.pool.idle), [ID_A])
        self.assertEqual(self.claimed, [])


class _End:
    """A native end that takes *room* bytes."""

    def __init__(self, room, error=None):
        self.room, self.error, self.sent = room, error, b""

    def send(self, data):
        if self.error is not None:
            raise self.error
        taken = bytes(data[:self.room])
        self.sent += taken
        return len(taken)


class _Stream:
    def __init__(self, end):
        self.end, self.written = end, b""

    def native_end(self):
        return self.end

    def write(self, data):
        self.written += data


class WriteNowTests(unittest.TestCase):
    """The OPEN frame goes straight to the socket when the stream offers
    one, so Twisted's write buffer stays empty for the zero-copy engine."""

    def test_straight_to_the_socket(self):
        stream = _Stream(_End(100))
        write_now(stream, b"OPEN-FRAME")
        self.assertEqual((stream.end.sent, stream.written), (b"OPEN-FRAME", b""))

    def test_what_the_socket_does_not_take_is_written_after_it(self):
        stream = _Stream(_End(4))
        write_now(stream, b"OPEN-FRAME")
        self.assertEqual((stream.end.sent, stream.written), (b"OPEN", b"-FRAME"))

    def test_socket_not_ready_or_failing_falls_back_to_the_write(self):
        for error in (BlockingIOError(), ConnectionResetError()):
            stream = _Stream(_End(100, error))
            write_now(stream, b"OPEN-FRAME")
            self.assertEqual(stream.written, b"OPEN-FRAME")

    def test_no_native_end(self):
        stream = _Stream(None)
        write_now(stream, b"OPEN-FRAME")
        self.assertEqual(stream.written, b"OPEN-FRAME")
