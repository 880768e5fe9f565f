"""Tests for tunnelpass.relay.splice: the zero-copy engine on real loopback sockets,
in-process (a forwarder factory between a client and a backend)."""

import fcntl
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface import implementer

from tests.helpers import until
from tunnelpass.relay import splice
from tunnelpass.carriers.nativeend import SocketEnd
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits

if not splice.AVAILABLE:
    skip = "os.splice is Linux-only"


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """Collects what it reads; signals EOF and close."""

    def __init__(self):
        self.data = bytearray()
        self.eof = Deferred()
        self.lost = Deferred()
        self.made = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof.callback(bytes(self.data))

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.eof.called:
            self.eof.callback(bytes(self.data))
        self.reason = reason
        self.lost.callback(None)



class SpliceRelayTests(unittest.TestCase):
    async def setUpRelay(self):
        self.backends = []

        def backend():
            peer = Peer()
            self.backends.append(peer)
            return peer

        backend_port = reactor.listenTCP(0, Factory.forProtocol(backend), interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        self.factory = TCPForwardFactory(
            reactor, "t", "127.0.0.1", backend_port.getHost().port, Limits(idle=0)
        )
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.client = Peer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), self.client)
        await until(lambda: self.backends and self.factory.relays)
        (self.inbound,) = self.factory.relays
        await until(lambda: self.inbound.engine is not None)
        self.backend = self.backends[0]
        await self.backend.made
        self.addCleanup(self._close)

    async def _close(self):
        for peer in (self.client, self.backend):
            if peer.transport.connected:
                peer.transport.abortConnection()
        await until(lambda: not self.factory.relays)

    async def test_relays_both_ways_with_half_close(self):
        await self.setUpRelay()
        payload = bytes(range(256)) * 4096  # 1 MiB
        self.client.transport.write(payload)
        self.client.transport.loseWriteConnection()
        self.assertEqual(await self.backend.eof, payload)
        self.backend.transport.write(b"reply after the client's FIN")
        self.backend.transport.loseConnection()
        self.assertEqual(await self.client.eof, b"reply after the client's FIN")
        await until(lambda: not self.factory.relays)
        stats = self.factory.stats
        self.assertEqual((stats.bytes_in, stats.bytes_out, stats.active), (len(payload), 28, 0))

    async def test_idle_relay_holds_no_pipe(self):
        await self.setUpRelay()
        self.client.transport.write(b"x" * 100_000)
        await until(lambda: len(self.backend.data) == 100_000)
        relay = self.inbound.engine
        self.assertIsNone(relay.a.outgoing.pipe)
        self.assertIsNone(relay.b.outgoing.pipe)

    async def test_slow_receiver_bounds_buffering(self):
        await self.setUpRelay()
        self.backend.transport.pauseProducing()  # the backend stops reading
        chunk = b"y" * 65536
        for _ in range(256):  # 16 MiB offered; the client buffers what the relay refuses
            self.client.transport.write(chunk)
        relay = self.inbound.engine
        direction = relay.a.outgoing
        await until(lambda: direction.pending > 0)
        await deferLater(reactor, 0.3)
        self.assertLessEqual(direction.pending, splice.PIPE_SIZE)
        self.assertNotIn(relay.a, relay.poller.getReaders(), "the sender is no longer read")
        self.assertIn(relay.b, relay.poller.getWriters())
        self.assertLess(self.factory.stats.bytes_in, 12 << 20)
        self.backend.transport.resumeProducing()
        await until(lambda: len(self.backend.data) == 256 * 65536, timeout=20)
        self.assertEqual(self.factory.stats.bytes_in, 256 * 65536)

    async def test_urgent_data_neither_spins_nor_truncates(self):
        await self.setUpRelay()
        relay = self.inbound.engine
        calls = []

        def counting_read():  # returns None, as a reactor descriptor must
            calls.append(1)
            relay.pump(relay.a.outgoing)

        relay.a.doRead = counting_read
        sock = socket.fromfd(self.client.transport.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        self.client.transport.write(b"A" * 1000)
        await until(lambda: len(self.backend.data) == 1000)
        sock.send(b"!", socket.MSG_OOB)
        await deferLater(reactor, 0.2)
        self.client.transport.write(b"B" * 1000)
        self.client.transport.loseWriteConnection()
        received = await self.backend.eof
        self.assertEqual(received, b"A" * 1000 + b"B" * 1000, "the urgent byte is skipped, as recv() does")
        self.assertLess(len(calls), 50, "the reactor must not spin on the urgent mark")

    async def test_urgent_data_with_a_small_pipe(self):
        """The kernel may grant pipes far below PIPE_SIZE (pipe-user-pages-soft)."""
        await self.setUpRelay()
        relay = self.inbound.engine

        class SmallPipes(splice.PipePool):
            def take(pool):
                read_fd, write_fd, *_ = splice.PipePool.take(pool)
                fcntl.fcntl(write_fd, 1031, 4096)
                return read_fd, write_fd, fcntl.fcntl(write_fd, 1032)

        relay.pipes = SmallPipes(limit=0)
        sock = socket.fromfd(self.client.transport.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.send(b"!", socket.MSG_OOB)
        await deferLater(reactor, 0.1)
        self.client.transport.write(b"C" * 20000)
        self.client.transport.loseWriteConnection()
        self.assertEqual(await self.backend.eof, b"C" * 20000)

    async def test_reset_of_one_side_still_delivers_what_was_read(self):
        await self.setUpRelay()
        relay = self.inbound.engine
        self.client.transport.pauseProducing()  # the client reads nothing for now
        self.backend.transport.write(b"r" * (64 << 20))  # more than the socket buffers hold
        await until(lambda: relay.b.outgoing.pending > 0, timeout=20)
        self.backend.transport.abortConnection()
        await deferLater(reactor, 0.1)
        self.client.transport.write(b"poke")  # writing to the reset backend fails
        await deferLater(reactor, 0.1)
        self.client.transport.resumeProducing()
        received = await self.client.eof
        self.assertGreater(len(received), 0)
        self.assertEqual(len(received), self.factory.stats.bytes_out,
                         "every byte read from the backend before its reset reaches the client")

    async def test_no_pipe_available_is_retried(self):
        await self.setUpRelay()
        relay = self.inbound.engine
        failures = [OSError(24, "Too many open files")] * 3

        class Starved(splice.PipePool):
            def take(pool):
                if failures:
                    raise failures.pop()
                return splice.PipePool.take(pool)

        relay.pipes = Starved()
        self.client.transport.write(b"later")
        await until(lambda: bytes(self.backend.data) == b"later")
        self.assertEqual(failures, [])
        self.assertTrue(self.client.transport.connected)

    async def test_abort_closes_both_sides(self):
        await self.setUpRelay()
        self.inbound.abort()
        await self.client.lost
        await self.backend.lost
        self.assertTrue(self.client.reason.check(ConnectionLost), "an abort is a reset, not a FIN")
        self.assertEqual(self.factory.relays, set())
        self.assertEqual(self.factory.stats.active, 0)

    async def test_pool_reuses_and_caps_pipes(self):
        pool = splice.PipePool(limit=1)
        first = pool.take()
        pool.give(first)
        self.assertIs(pool.take(), first)
        second = pool.take()
        pool.give(first)
        pool.give(second)  # over the limit: closed
        self.assertEqual(pool.idle, [first])
        pool.discard(pool.take())


class _SocketOnly:
    """Just what SpliceRelay asks of a transport."""

    connected = True

    def __init__(self, sock):
        self.socket = sock
        self.lost = []

    def connectionLost(self, reason):
        self.connected = False
        self.lost.append(reason)


class FailureDrainBoundTests(unittest.TestCase):
    def test_a_peer_that_does_not_read_is_reset_within_the_flush_limit(self):
        """After one socket fails, the other gets what the pipe holds for it
        -- but a peer that never reads is reset FLUSH_LIMIT later instead of
        holding four descriptors until the idle timeout."""
        from twisted.internet.testing import MemoryReactorClock

        from tunnelpass.relay.closing import FLUSH_LIMIT

        clock = MemoryReactorClock()
        pairs = [socket.socketpair() for _ in range(2)]
        for pair in pairs:
            self.addCleanup(lambda p=pair: [s.close() for s in p])
        broken, alive = _SocketOnly(pairs[0][0]), _SocketOnly(pairs[1][0])
        relay = splice.SpliceRelay(clock, SocketEnd(broken), SocketEnd(alive),
                                   lambda: None, lambda n: None, lambda n: None)
        relay.a.outgoing.pending = 10  # bytes from the broken side still in the pipe for the other
        relay.fail(relay.a, OSError("connection reset"))
        self.assertFalse(relay.finished, "first, the pipe is delivered")
        clock.advance(FLUSH_LIMIT)
        self.assertTrue(relay.finished)
        self.assertEqual(len(alive.lost), 1, "the peer that did not read is closed (reset)")
