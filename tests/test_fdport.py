"""BudgetPort: accept() that runs out of descriptors is handled, counted and
warned once per batch; a descriptor in the reserve is refused; the normal
path still serves connections (on a real reactor)."""

import errno
import socket

from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from tests.helpers import until
from tunnelpass.ops.fdbudget import Descriptors
from tunnelpass.ops.fdport import PAUSE, BudgetPort, SpareDescriptor, listen_tcp
from tunnelpass.ops.stats import ListenerStats


class FakeAccepted:
    """An accepted socket as far as the shedding paths look at it."""

    def __init__(self, fd):
        self.fd, self.closed = fd, False

    def fileno(self):
        return self.fd

    def close(self):
        self.closed = True


class ScriptedListener:
    """``accept()`` returns or raises what the script says, then EAGAIN."""

    def __init__(self, script):
        self.script = list(script)

    def shutdown(self, how):
        pass

    def close(self):
        pass

    def accept(self):
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "again")
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step, ("127.0.0.1", 40000)


class FakeSpare(SpareDescriptor):
    def __init__(self, held=True):
        super().__init__(opener=self._open, closer=lambda fd: None)
        self.can_open = True
        self.fd = 99 if held else None
        self.takes = 0

    def _open(self):
        self.takes += 1
        if not self.can_open:
            raise OSError(errno.EMFILE, "Too many open files")
        return 99


def emfile():
    return OSError(errno.EMFILE, "Too many open files")


class BudgetPortTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.stats = ListenerStats()
        self.built = []
        factory = Factory.forProtocol(Protocol)
        factory.buildProtocol = lambda addr: self.built.append(addr)  # None: the port closes it
        self.descriptors = Descriptors(self.reactor, limit=1024, count=lambda: 10)
        self.spare = FakeSpare()
        self.port = BudgetPort(0, factory, 50, "127.0.0.1", self.reactor, self.descriptors, self.stats,
                               "127.0.0.1:80/tcp", spare=self.spare)
        self.port.numberAccepts = 100
        self.port.connected = True

    def run_accepts(self, script):
        self.port.socket = ScriptedListener(script)
        with capturedLogs() as events:
            self.port.doRead()
        return [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]

    def test_emfile_sheds_what_waits_with_the_spare_descriptor(self):
        waiting = [FakeAccepted(5), FakeAccepted(5), FakeAccepted(5)]
        warnings = self.run_accepts([FakeAccepted(4), emfile(), *waiting])
        self.assertEqual(len(self.built), 1)  # the first was served
        self.assertTrue(all(s.closed for s in waiting))
        self.assertEqual(self.stats.refused, 3)
        self.assertEqual(self.descriptors.exhausted["accept"], 1)
        self.assertEqual(self.spare.fd, 99, "the spare is taken again")
        self.assertEqual(len(warnings), 1)
        self.assertIn("EMFILE at accept on 127.0.0.1:80/tcp", warnings[0])
        self.assertIn("3 connection(s) refused", warnings[0])

    def test_without_a_spare_accepting_pauses_instead_of_spinning(self):
        self.spare.fd = None
        self.spare.can_open = False
        self.reactor.addReader(self.port)
        self.run_accepts([emfile()])
        self.assertNotIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.descriptors.exhausted["accept"], 1)
        self.assertEqual(self.stats.refused, 0, "nothing was lost: the kernel keeps the queue")
        self.spare.can_open = True
        self.reactor.advance(PAUSE)
        self.assertIn(self.port, self.reactor.getReaders())

    def test_no_memory_pauses_without_touching_the_spare(self):
        self.reactor.addReader(self.port)
        self.run_accepts([OSError(errno.ENOBUFS, "No buffer space available"), FakeAccepted(5)])
        self.assertEqual(self.spare.fd, 99)
        self.assertNotIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.descriptors.exhausted["accept"], 1)

    def test_a_descriptor_in_the_reserve_is_refused(self):
        ceiling = self.descriptors.ceiling
        low, high, higher = FakeAccepted(ceiling - 1), FakeAccepted(ceiling), FakeAccepted(ceiling)
        warnings = self.run_accepts([low, high, higher])
        self.assertEqual(len(self.built), 1)
        self.assertTrue(high.closed and higher.closed)
        self.assertEqual(self.stats.refused, 2)
        self.assertEqual(self.descriptors.exhausted["accept"], 1, "one event per batch")
        self.assertIn("only the 4 kept for connections in progress were left at accept", warnings[0])

    def test_transient_errors_are_skipped(self):
        self.run_accepts([OSError(errno.ECONNABORTED, "aborted"), OSError(errno.EPERM, "netfilter"),
                          FakeAccepted(4)])
        self.assertEqual(len(self.built), 1)
        self.assertEqual(self.descriptors.exhausted["accept"], 0)

    def test_stop_listening_cancels_a_pause(self):
        self.spare.fd = None
        self.spare.can_open = False
        self.run_accepts([emfile()])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.port.fileno = lambda: 7  # as startListening leaves it
        self.port.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class RealReactorTests(unittest.TestCase):
    async def test_listen_tcp_serves_on_a_real_reactor(self):
        descriptors = Descriptors(global_reactor)
        port = listen_tcp(global_reactor, 0, Factory.forProtocol(_Echo), 50, "127.0.0.1", descriptors,
                          ListenerStats(), "echo")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, BudgetPort)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        client.setblocking(False)
        client.send(b"ping")
        received = []

        def echoed():
            try:
                received.append(client.recv(10))
            except BlockingIOError:
                pass
            return b"".join(received) == b"ping"

        await until(echoed)

    def test_without_a_budget_or_real_reactor_the_reactors_own_port(self):
        memory = MemoryReactorClock()
        listen_tcp(memory, 1234, Factory.forProtocol(_Echo), 50, "127.0.0.1", Descriptors(memory))
        self.assertEqual(memory.tcpServers[0][0], 1234)
