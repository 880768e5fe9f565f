"""Tests for tunnelpass.relay.pump (the copy pump), tunnelpass.carriers.nativeend (native
ends: plain socket, TLS by OpenSSL on the socket) and tunnelpass.relay.engines
(which engine a pair gets).

Real loopback TCP sockets and real TLS (pyOpenSSL): each relay end is a
Twisted TCP transport accepted by a real listener (the engine closes it
through it, as in the product), its peer a plain or TLS socket driven by a
thread with non-blocking I/O and deadlines."""

import hashlib
import random
import select
import socket
import struct
import time

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer

from tests.helpers import until
from tunnelpass.relay import pump, splice
from tunnelpass.relay.engines import engine_for
from tunnelpass.carriers.nativeend import SocketEnd, TLSEnd
from tunnelpass.relay.ratelimit import RateLimiter
from tunnelpass.carriers.stream import INativeEnd, IStream, NeedRead, NeedWrite, TCPStream
from tunnelpass.carriers.tls import self_signed

DEADLINE = 20.0
_KEY, _CERT = self_signed("pump-test")


def _server_context():
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(_CERT)
    ctx.use_privatekey(_KEY)
    return ctx


def _client_context():
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    return ctx


def _payload(size, seed):
    return random.Random(seed).randbytes(size)


class Peer:
    """The far end of one relay leg: a socket (TLS or not) used from a
    thread, non-blocking, every wait bounded."""

    def __init__(self, sock, conn=None):
        sock.setblocking(False)
        self.sock, self.conn = sock, conn
        self.io = conn if conn is not None else sock

    def _wait(self, read, write):
        r, w, _ = select.select([self.sock] if read else [], [self.sock] if write else [], [], 0.05)
        return bool(r or w)

    def recv(self, size=65536):
        """Bytes, b"" on a clean end (FIN; close_notify); ConnectionResetError
        on a reset; TimeoutError if nothing comes."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                return self.io.recv(size)
            except SSL.ZeroReturnError:
                return b""
            except SSL.WantWriteError:
                self._wait(False, True)
            except (SSL.WantReadError, BlockingIOError):
                self._wait(True, False)
            except SSL.SysCallError as e:
                if e.args[0] == -1:
                    raise EOFError("TLS stream cut without close_notify") from None
                raise OSError(e.args[0], e.args[1]) from None
        raise TimeoutError

    def recv_exact(self, size):
        data = bytearray()
        while len(data) < size:
            chunk = self.recv(size - len(data))
            if not chunk:
                raise EOFError(f"EOF after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def send_all(self, data):
        view, sent = memoryview(data), 0
        deadline = time.monotonic() + DEADLINE
        while sent < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError
            try:
                sent += self.io.send(view[sent:sent + 65536])
            except (SSL.WantWriteError, BlockingIOError):
                self._wait(False, True)
            except SSL.WantReadError:
                self._wait(True, False)

    def shutdown_write(self):
        if self.conn is not None:
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                try:
                    self.conn.shutdown()
                    break
                except (SSL.WantWriteError, SSL.WantReadError):
                    self._wait(True, True)
        self.sock.shutdown(socket.SHUT_WR)

    def read_to_eof(self):
        data = bytearray()
        while True:
            chunk = self.recv()
            if not chunk:
                return bytes(data)
            data += chunk

    def read_then_end(self):
        """Read until the peer's end, then end this side's data too."""
        data = self.read_to_eof()
        self.shutdown_write()
        return data

    def exchange(self, data, shut=True):
        """Send *data* (then half-close) while reading until the peer's end;
        what was read."""
        view, sent, got, eof, shut_done = memoryview(data), 0, bytearray(), False, not shut
        deadline = time.monotonic() + DEADLINE
        while not (eof and sent == len(data) and shut_done):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sent {sent}, got {len(got)}, eof {eof}")
            progressed = False
            if sent < len(data):
                try:
                    sent += self.io.send(view[sent:sent + 65536])
                    progressed = True
                except (SSL.WantWriteError, SSL.WantReadError, BlockingIOError):
                    pass
            if sent == len(data) and not shut_done:
                self.shutdown_write()
                shut_done = True
            if not eof:
                try:
                    chunk = self.io.recv(65536)
                except (SSL.WantReadError, SSL.WantWriteError, BlockingIOError):
                    chunk = None
                except SSL.ZeroReturnError:
                    chunk = b""
                if chunk is not None:
                    progressed = True
                    got += chunk
                    eof = not chunk
            if not progressed:
                self._wait(not eof, sent < len(data))
        return bytes(got)

    def reset(self):
        """Close with an RST (SO_LINGER 0), no close_notify."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Held(Protocol):
    """The relay side of a leg before the engine takes it: reads nothing."""

    reason = None

    def connectionMade(self):
        self.transport.stopReading()
        self.factory.accepted.append(self)

    def connectionLost(self, reason):
        self.reason = reason


def _handshake(*conns):
    """Both ends of a TLS connection in this thread, non-blocking."""
    deadline = time.monotonic() + DEADLINE
    todo = list(conns)
    while todo:
        assert time.monotonic() < deadline, "TLS handshake did not finish"
        for conn in list(todo):
            try:
                conn.do_handshake()
                todo.remove(conn)
            except (SSL.WantReadError, SSL.WantWriteError):
                pass
        if todo:
            select.select([c.fileno() for c in todo], [], [], 0.01)


class PumpCase(unittest.TestCase):
    async def leg(self, tls):
        """(peer, relay-side transport, native end): one accepted loopback
        connection, TLS between the peer (client) and the end (server) when
        *tls*."""
        factory = Factory.forProtocol(Held)
        factory.accepted = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        await until(lambda: factory.accepted)
        (held,) = factory.accepted
        transport = held.transport
        conn = end = None
        if tls:
            server = SSL.Connection(_server_context(), transport.socket)
            server.set_accept_state()
            sock.setblocking(False)
            conn = SSL.Connection(_client_context(), sock)
            conn.set_connect_state()
            _handshake(conn, server)
            end = TLSEnd(transport, server)
        else:
            end = SocketEnd(transport)
        peer = Peer(sock, conn)
        self.addCleanup(peer.close)
        self.addCleanup(lambda: transport.connected and transport.abortConnection())
        return peer, held, end

    async def relay(self, tls_a, tls_b, limiter=None, start=True, to_outbound=b""):
        """Peer x -- [a] relay [b] -- peer y."""
        self.x, self.held_a, end_a = await self.leg(tls_a)
        self.y, self.held_b, end_b = await self.leg(tls_b)
        self.counts = {"in": 0, "out": 0, "activity": 0}

        def count(key):
            def add(n=1):
                self.counts[key] += n
            return add

        self.engine = pump.PumpRelay(reactor, end_a, end_b, count("activity"), count("in"), count("out"),
                                     limiter=limiter)
        self.addCleanup(self.engine.abort)
        if start:
            self.assertTrue(self.engine.start(to_outbound=to_outbound))
        return self.engine

    async def ended(self):
        await until(lambda: self.held_a.reason is not None and self.held_b.reason is not None, timeout=DEADLINE)
        return self.held_a.reason, self.held_b.reason


class IntegrityTests(PumpCase):
    async def check_both_ways(self, tls_a, tls_b, size=8 << 20):
        await self.relay(tls_a, tls_b)
        up, down = _payload(size, 1), _payload(size, 2)
        got_y, got_x = await gatherResults([deferToThread(self.y.exchange, down),
                                            deferToThread(self.x.exchange, up)])
        self.assertEqual(hashlib.sha256(got_y).hexdigest(), hashlib.sha256(up).hexdigest())
        self.assertEqual(hashlib.sha256(got_x).hexdigest(), hashlib.sha256(down).hexdigest())
        reasons = await self.ended()
        for reason in reasons:
            self.assertTrue(reason.check(ConnectionDone), reason)
        self.assertEqual((self.counts["in"], self.counts["out"]), (size, size))
        for d in (self.engine.a.outgoing, self.engine.b.outgoing):
            self.assertIsNone(d.held)

    async def test_plain_to_tls(self):
        await self.check_both_ways(False, True)

    async def test_tls_to_plain(self):
        await self.check_both_ways(True, False)

    async def test_tls_to_tls(self):
        await self.check_both_ways(True, True)

    async def test_request_response(self):
        await self.relay(False, True)

        def server():
            for _ in range(300):
                request = self.y.recv_exact(100)
                self.y.send_all(request[::-1] * 3)
            rest = self.y.read_to_eof()
            self.y.shutdown_write()
            return rest

        def client():
            for i in range(300):
                request = bytes([i % 256]) * 50 + bytes(range(50))
                self.x.send_all(request)
                self.assertEqual(self.x.recv_exact(300), request[::-1] * 3)
            self.x.shutdown_write()
            return self.x.read_to_eof()

        rest = await gatherResults([deferToThread(server), deferToThread(client)])
        self.assertEqual(rest, [b"", b""])  # each side's end of data reached the other
        self.assertEqual((self.counts["in"], self.counts["out"]), (30000, 90000))


class HalfCloseTests(PumpCase):
    async def check(self, tls_a, tls_b, first):
        await self.relay(tls_a, tls_b)
        closer, other = (self.x, self.y) if first == "x" else (self.y, self.x)

        def closing_side():
            return closer.exchange(b"request then my end", shut=True)

        def answering_side():
            request = other.read_to_eof()  # the end of data came through...
            other.send_all(b"answer after your end: " + request)  # ...and this way still flows
            other.shutdown_write()
            return request

        answer, request = await gatherResults([deferToThread(closing_side), deferToThread(answering_side)])
        self.assertEqual(request, b"request then my end")
        self.assertEqual(answer, b"answer after your end: request then my end")
        for reason in await self.ended():
            self.assertTrue(reason.check(ConnectionDone), reason)

    async def test_tls_side_half_closes_first(self):
        await self.check(True, False, "x")

    async def test_plain_side_half_closes_first(self):
        await self.check(True, False, "y")

    async def test_tls_to_tls_half_close(self):
        await self.check(True, True, "y")

    async def test_close_notify_comes_without_a_tcp_fin(self):
        """A peer on Twisted's TLS (an older tunnelpass) reads a TCP FIN as
        the end of both directions: after close_notify the socket must
        stay open for the direction that still flows."""
        await self.relay(True, False)
        self.y.shutdown_write()  # the plain side ends its data
        self.assertEqual(await deferToThread(self.x.read_to_eof), b"")  # close_notify arrived
        with self.assertRaises(BlockingIOError):  # and no FIN behind it
            self.x.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        await deferToThread(self.x.send_all, b"still flowing")
        self.x.shutdown_write()
        self.assertEqual(await deferToThread(self.y.read_to_eof), b"still flowing")


class AbnormalEndTests(PumpCase):
    def assert_reset(self, peer):
        """The peer sees a reset, never a clean end of data."""
        try:
            data = peer.read_to_eof()
        except ConnectionResetError:
            return
        except OSError as e:
            self.assertEqual(e.errno, 104, e)
            return
        self.fail(f"a clean end of data after {len(data)} bytes instead of a reset")

    async def test_reset_of_plain_side_resets_tls_peer(self):
        await self.relay(True, False)
        await deferToThread(self.x.send_all, b"before the reset")
        self.assertEqual(await deferToThread(self.y.recv_exact, 16), b"before the reset")
        self.y.reset()
        await deferToThread(self.assert_reset, self.x)
        reasons = await self.ended()
        self.assertFalse(any(r.check(ConnectionDone) for r in reasons))

    async def test_tls_truncation_resets_plain_peer(self):
        await self.relay(True, False)
        await deferToThread(self.x.send_all, b"data, then a FIN without close_notify")
        self.x.sock.shutdown(socket.SHUT_WR)  # TCP end, no close_notify
        self.assertEqual(await deferToThread(self.y.recv_exact, 37), b"data, then a FIN without close_notify")
        await deferToThread(self.assert_reset, self.y)
        a, b = await self.ended()
        self.assertIn("close_notify", a.getErrorMessage())
        self.assertTrue(b.check(ConnectionAborted))

    async def test_abort_resets_both(self):
        await self.relay(True, False)
        self.engine.abort()
        await deferToThread(self.assert_reset, self.x)
        await deferToThread(self.assert_reset, self.y)
        for reason in await self.ended():
            self.assertTrue(reason.check(ConnectionAborted), reason)

    async def test_a_side_whose_close_fails_does_not_keep_the_other_open(self):
        await self.relay(True, False)
        transport = self.held_a.transport
        real = transport.connectionLost

        def failing(reason):
            real(reason)
            raise RuntimeError("injected: closing fails")

        transport.connectionLost = failing
        self.engine.abort()
        await deferToThread(self.assert_reset, self.y)
        self.assertIsNotNone((await self.ended())[1])
        self.flushLoggedErrors(RuntimeError)


class FlowTests(PumpCase):
    async def test_slow_receiver_bounds_memory(self):
        await self.relay(True, False)
        total = [0]

        def flood():  # until the relay stops taking (send blocks for a while)
            chunk = b"z" * 65536
            idle_since = None
            while True:
                try:
                    total[0] += self.x.io.send(chunk)
                    idle_since = None
                except (SSL.WantWriteError, SSL.WantReadError):
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 0.5:
                        return
                    self.x._wait(False, True)

        await deferToThread(flood)
        d = self.engine.a.outgoing
        self.assertGreater(d.pending, 0, "the receiver's kernel buffers are full: a remainder is held")
        self.assertLessEqual(d.pending, pump.CHUNK)
        self.assertEqual(len(d.held), d.pending)
        self.assertNotIn(self.engine.a, self.engine.poller.getReaders(), "the source is not read while dst is full")
        self.assertIn(self.engine.b, self.engine.poller.getWriters())
        self.assertLess(self.counts["in"], total[0], "the rest waits in the sender's and kernel buffers")
        def finish():  # OpenSSL wants the send it refused retried before anything else
            self.x.send_all(b"z" * 65536)
            total[0] += 65536
            self.x.shutdown_write()

        received, _ = await gatherResults([deferToThread(self.y.read_to_eof), deferToThread(finish)])
        self.assertEqual(received, b"z" * total[0])
        self.assertIsNone(d.held)

    async def test_slow_tls_receiver_bounds_memory(self):
        """A TLS receiver that does not read: what its socket refuses is
        held (one chunk at most), the plain source is not read meanwhile,
        and every byte arrives once it reads."""
        await self.relay(False, True)
        total = [0]

        def flood():
            self.x.sock.setblocking(False)
            chunk = b"q" * 65536
            idle_since = None
            while True:
                try:
                    total[0] += self.x.sock.send(chunk)
                    idle_since = None
                except BlockingIOError:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 0.5:
                        self.x.sock.setblocking(True)
                        return
                    time.sleep(0.01)

        await deferToThread(flood)
        d = self.engine.a.outgoing
        self.assertGreater(d.pending, 0, "the TLS receiver is full: a remainder is held")
        self.assertLessEqual(d.pending, pump.CHUNK)
        self.assertNotIn(self.engine.a, self.engine.poller.getReaders(), "the source is not read while dst is full")
        self.assertIn(self.engine.b, self.engine.poller.getWriters())
        self.x.shutdown_write()
        received = await deferToThread(self.y.read_to_eof)
        self.assertEqual(len(received), total[0])
        self.assertEqual(received, b"q" * total[0])
        self.assertIsNone(d.held)

    async def test_rate_limit(self):
        limiter = RateLimiter(reactor, 1 << 20)  # 1 MiB/s, 64 KiB burst
        await self.relay(False, True, limiter=limiter)
        payload = _payload(512 << 10, 3)
        started = time.monotonic()
        got, _ = await gatherResults([deferToThread(self.y.read_then_end),
                                      deferToThread(self.x.exchange, payload, True)])
        elapsed = time.monotonic() - started
        self.assertEqual(got, payload)
        self.assertGreater(limiter.paused_total, 0, "the source was made to wait")
        # A lower bound only (throttling can only slow things down):
        # (512 - 64) KiB at 1 MiB/s is 0.44 s.
        self.assertGreater(elapsed, 0.3)

    async def read_one_ahead(self):
        """x sends one record; the relay's TLS end reads one byte of it, so
        the other nine wait inside OpenSSL (no readiness event announces them)."""
        await self.relay(True, False, start=False)
        await deferToThread(self.x.send_all, b"0123456789")
        server = self.engine.a.end.conn
        deadline = time.monotonic() + DEADLINE
        first = None
        while first is None and time.monotonic() < deadline:
            try:
                first = server.recv(1)
            except SSL.WantReadError:
                select.select([server.fileno()], [], [], 0.05)
        self.assertEqual(server.pending(), 9)
        return first

    async def test_pending_tls_bytes_are_drained_at_start(self):
        await self.read_one_ahead()
        self.assertTrue(self.engine.start())
        self.assertEqual(await deferToThread(self.y.recv_exact, 9), b"123456789")

    async def test_pending_tls_bytes_follow_a_prefix(self):
        first = await self.read_one_ahead()
        self.assertTrue(self.engine.start(to_outbound=first))
        self.assertEqual(await deferToThread(self.y.recv_exact, 10), b"0123456789")

    async def test_pending_tls_bytes_are_drained_after_a_stall(self):
        """Chunks that end inside a TLS record (the rest stays decrypted
        inside OpenSSL) and a source resumed after its receiver drained:
        every byte arrives, in order."""
        # Read on past whole records: a chunk then ends inside a record.
        self.patch(pump, "TLS_RECORD", 1)
        await self.relay(True, False)
        payload = _payload(pump.CHUNK * 3 + 5000, 4)
        got, _ = await gatherResults([deferToThread(self.y.read_then_end),
                                      deferToThread(self.x.exchange, payload, True)])
        self.assertEqual(got, payload)


@implementer(IStream)
class _TLSStream:
    """A stream whose carrier offers a TLS end (as the TLS carrier does)."""

    def __init__(self, end):
        self.end = end

    def native_end(self):
        return self.end


class EngineChoiceTests(PumpCase):
    async def test_choice(self):
        x, held_a, plain_a = await self.leg(False)
        y, held_b, plain_b = await self.leg(False)
        z, held_c, tls_c = await self.leg(True)
        ta, tb = held_a.transport, held_b.transport
        self.assertIsInstance(IStream(ta), TCPStream)
        args = (lambda: None, lambda n: None, lambda n: None)
        if splice.AVAILABLE:
            self.assertIsInstance(engine_for(reactor, ta, tb, True, *args), splice.SpliceRelay)
        self.assertIsNone(engine_for(reactor, ta, tb, False, *args), "zero-copy off: Twisted relays plain pairs")
        tls = _TLSStream(tls_c)
        for pair in ((ta, tls), (tls, ta)):
            self.assertIsInstance(engine_for(reactor, *pair, True, *args), pump.PumpRelay)
            self.assertIsNone(engine_for(reactor, *pair, False, *args), "zero-copy off: Twisted relays TLS too")
        self.assertIsNone(engine_for(reactor, ta, StringTransport(), True, *args), "not a stream")
        self.assertIsNone(engine_for(reactor, _TLSStream(None), tls, True, *args), "no native end")
        ta.write(b"unsent")  # Twisted's buffer holds bytes: an engine would skip them
        self.assertIsNone(engine_for(reactor, ta, tls, True, *args))


class _FakeTransport:
    connected = True

    def stopReading(self):
        pass

    def stopWriting(self):
        pass

    def connectionLost(self, reason):
        self.connected = False


@implementer(INativeEnd)
class _ScriptedEnd:
    """A TLS end whose reads follow a script: bytes, or an exception."""

    kind = "tls"

    def __init__(self, fd, reads=()):
        self.fd, self.reads, self.transport = fd, list(reads), _FakeTransport()
        self.sent = b""

    def fileno(self):
        return self.fd

    def recv_into(self, buffer):
        step = self.reads.pop(0) if self.reads else NeedRead()
        if isinstance(step, BaseException):
            raise step
        buffer[:len(step)] = step
        return len(step)

    def send(self, data):
        self.sent += bytes(data)
        return len(data)

    def pending(self):
        return 1 if self.reads else 0

    def shutdown_write(self):
        return True

    def unsent(self):
        return 0


class PartialReadThenNeedWriteTests(unittest.TestCase):
    def test_the_source_waits_for_writable_after_delivering(self):
        """A full record, then OpenSSL must write before reading on (a TLS
        1.3 key update under write pressure): the record is delivered and
        the source waits for writable, not for a readable event that the
        bytes already inside OpenSSL would never raise."""
        from twisted.internet.testing import MemoryReactorClock

        memory = MemoryReactorClock()
        src = _ScriptedEnd(100, [b"r" * pump.TLS_RECORD, NeedWrite()])
        dst = _ScriptedEnd(101)
        engine = pump.PumpRelay(memory, src, dst, lambda: None, lambda n: None, lambda n: None)
        engine.start()
        d = engine.a.outgoing
        engine.pump(d)
        self.assertEqual(dst.sent, b"r" * pump.TLS_RECORD)
        self.assertTrue(d.read_needs_write)
        self.assertIn(engine.a, memory.getWriters())
        self.assertNotIn(engine.a, memory.getReaders())
        engine.abort()
