"""A stop is bounded: tunnelpass.ops.signals.StopWatchdog (sans-IO, task.Clock)
and its last resort, force_exit (in a child process: it ends the process)."""

import os
import socket
import subprocess
import sys
import textwrap

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tunnelpass.ops.signals import STOP_MARGIN, Signals, StopWatchdog


class WatchdogTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.ended = []
        self.watchdog = StopWatchdog(self.clock, lambda: self.ended.append(self.clock.seconds()))

    def test_last_resort_after_timeout_plus_margin(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.watchdog.start(5)
        self.clock.advance(5 + STOP_MARGIN - 0.01)
        self.assertEqual(self.ended, [])
        self.clock.advance(0.01)
        self.assertEqual(self.ended, [5 + STOP_MARGIN])
        self.assertTrue(any(e.get("event") == "shutdown_forced" for e in events))

    def test_a_completed_stop_cancels_it(self):
        self.watchdog.start(5)
        self.clock.advance(3)
        self.watchdog.cancel()
        self.clock.advance(100)
        self.assertEqual(self.ended, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_second_start_does_not_move_the_bound(self):
        self.watchdog.start(5)
        self.clock.advance(4)
        self.watchdog.start(5)  # another service's stopService
        self.clock.advance(5 + STOP_MARGIN - 4)
        self.assertEqual(len(self.ended), 1)

    def test_signals_restore_ends_the_watch(self):
        clock = Clock()
        ended = []
        signals = Signals(clock, last_resort=lambda: ended.append(True))
        signals.bound_stop(1)
        signals.restore()
        clock.advance(60)
        self.assertEqual(ended, [])


class ForceExitTests(unittest.TestCase):
    def test_resets_live_connections_and_exits_zero(self):
        """The process ends with status 0 and its peer sees a reset, not the
        FIN a plain exit would send -- also for a connection the reactor is
        not watching at that moment (a leg paused by backpressure)."""
        child = textwrap.dedent("""
            import socket, sys
            from tunnelpass.ops.signals import force_exit

            class Selectable:
                def __init__(self, sock):
                    self.socket = sock

            class Reactor:
                def __init__(self, sock):
                    self.readers = []  # paused: not registered for reading
                def getReaders(self):
                    return self.readers
                def getWriters(self):
                    return []

            sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
            sock.sendall(b"ready")
            force_exit(Reactor(sock))
            print("not reached")
        """)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        process = subprocess.Popen([sys.executable, "-c", child, str(listener.getsockname()[1])],
                                   stdout=subprocess.PIPE, cwd=os.getcwd(),
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        listener.settimeout(10)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        peer.settimeout(10)
        self.assertEqual(peer.recv(5), b"ready")
        output, _ = process.communicate(timeout=10)
        self.assertEqual(process.returncode, 0)
        self.assertNotIn(b"not reached", output)
        with self.assertRaises(ConnectionResetError):
            peer.recv(10)
