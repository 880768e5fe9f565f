"""The engines' own epoll set: readiness dispatched in batches from one
reactor reader, registration as the reactor's, cleanup."""

import socket

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from tests.helpers import until
from tunnelpass.relay.enginepoll import EnginePoller, poller_for


class Recorder:
    def __init__(self, sock, fail=False):
        self.sock, self.fail = sock, fail
        self.events = []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.events.append("read")
        if self.fail:
            raise RuntimeError("injected")
        self.sock.recv(100)

    def doWrite(self):
        self.events.append("write")

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type.__name__))


class EnginePollerTests(TestCase):
    def pair(self):
        a, b = socket.socketpair()
        a.setblocking(False)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def test_one_set_per_epoll_reactor_and_none_for_others(self):
        self.assertIs(poller_for(reactor), poller_for(reactor))
        self.assertIsInstance(poller_for(reactor), EnginePoller)
        memory = MemoryReactorClock()
        self.assertIs(poller_for(memory), memory)

    async def test_ready_sockets_are_served_and_the_set_leaves_the_reactor_when_empty(self):
        poller = EnginePoller(reactor)
        (a, b), (c, d) = self.pair(), self.pair()
        first, second = Recorder(a), Recorder(c)
        poller.addReader(first)
        poller.addReader(second)
        self.assertIn(poller, reactor.getReaders())  # one reader for both
        self.assertNotIn(first, reactor.getReaders())
        b.send(b"x")
        d.send(b"y")
        await until(lambda: first.events and second.events)
        self.assertEqual((first.events, second.events), (["read"], ["read"]))
        poller.addWriter(first)
        await until(lambda: "write" in first.events)
        poller.removeWriter(first)
        poller.removeReader(first)
        poller.removeReader(second)
        self.assertEqual((poller.getReaders(), poller.getWriters()), ([], []))
        self.assertNotIn(poller, reactor.getReaders())

    async def test_a_failing_handler_loses_only_its_own_socket(self):
        poller = EnginePoller(reactor)
        (a, b), (c, d) = self.pair(), self.pair()
        bad, good = Recorder(a, fail=True), Recorder(c)
        poller.addReader(bad)
        poller.addReader(good)
        b.send(b"x")
        await until(lambda: len(bad.events) == 2)
        self.assertEqual(bad.events, ["read", ("lost", "RuntimeError")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        d.send(b"y")
        await until(lambda: good.events == ["read"])
        poller.removeReader(good)

    async def test_hang_up_without_data_is_a_lost_connection(self):
        poller = EnginePoller(reactor)
        a, b = self.pair()
        side = Recorder(a)
        poller.addWriter(side)  # writing only: a hang-up is not a read
        poller.removeWriter(side)
        b.close()
        a.shutdown(socket.SHUT_RDWR)
        poller.addWriter(side)
        await until(lambda: any(isinstance(e, tuple) for e in side.events))
        self.assertIn(("lost", "ConnectionDone"), side.events)
        self.assertEqual(poller.getWriters(), [])

    async def test_a_closed_then_reused_descriptor_registers_again(self):
        poller = EnginePoller(reactor)
        a, b = socket.socketpair()
        fd = a.fileno()
        poller.addReader(Recorder(a))
        a.close()  # the kernel drops it from the set; our books still hold it
        b.close()
        c, d = self.pair()
        while c.fileno() != fd and d.fileno() != fd:  # get the same number back
            c, d = self.pair()
        sock = c if c.fileno() == fd else d
        other = d if sock is c else c
        reused = Recorder(sock)
        poller.addReader(reused)
        other.send(b"z")
        await until(lambda: reused.events == ["read"])
        poller.removeReader(reused)

    def test_shutdown_loses_every_socket(self):
        poller = EnginePoller(reactor)
        a, _ = self.pair()
        side = Recorder(a)
        poller.addReader(side)
        from twisted.python.failure import Failure
        from twisted.internet.error import ConnectionLost
        poller.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(side.events, [("lost", "ConnectionLost")])
        self.assertEqual(poller.getReaders(), [])
        reactor.removeReader(poller)
