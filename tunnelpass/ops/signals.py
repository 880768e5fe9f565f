# -*- test-case-name: tests.test_forward -*-
"""Process signals for the long-running services (forward, server, client).

* twistd's own SIGTERM/SIGINT handlers make the process die by the signal
  (exit status 143/130) after shutdown; a drained, orderly stop should exit
  0, so ours just stop the reactor (services drain in ``stopService``).
  The reactor installs its own when it starts, so services call
  :meth:`Signals.install_stop` twice: in ``privilegedStartService`` (a
  signal during startup) and from ``reactor.callWhenRunning``.
* SIGHUP would kill twistd (exit 129, no ``stopService``): services that
  reload install it with :meth:`Signals.install`.
* A handler only schedules its action in the reactor thread: signals may
  interrupt the reactor anywhere, so no work happens inside them.
* A stop is bounded: services call :meth:`Signals.bound_stop` as their
  ``stopService`` begins.  Their drains reset whatever is left after
  ``--shutdown-timeout``; should the stop still not complete (a Deferred
  that never fires, a close path that hangs), :class:`StopWatchdog` ends
  the process :data:`STOP_MARGIN` seconds later -- every TCP connection
  reset, exit status 0 (the stop was asked for and happened in time; the
  critical ``shutdown_forced`` event says it was not orderly).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

log = Logger(namespace="tunnelpass")

#: Seconds a stop may take beyond --shutdown-timeout before the process is ended.
STOP_MARGIN = 2.0


def force_exit(reactor, status: int = 0) -> None:
    """The last resort: reset every TCP connection the process still holds
    (``SO_LINGER`` 0, so that no peer mistakes the cut for a complete
    stream, as the FINs of a plain exit would let it), flush the log, and
    end the process now with *status*.

    Every descriptor counts, not only those the reactor watches: a leg
    paused by backpressure, one waiting to flush before its reset, or a
    splice socket is not registered for reading at that moment."""
    for fd in _descriptors(reactor):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket
        try:
            if sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays open (and is reset at exit)
    exit_now(status)


def exit_now(status: int) -> None:
    """Flush standard output and error (the log) and end the process with
    *status* at once, without Python's exit handlers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _descriptors(reactor) -> list[int]:
    """This process's open descriptors (``/proc/self/fd``), or the ones the
    reactor watches where that is not available."""
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return [selectable.fileno() for selectable in list(reactor.getReaders()) + list(reactor.getWriters())]


class StopWatchdog:
    """Bounds a stop: unless :meth:`cancel` comes first, *last_resort*
    runs *timeout* + *margin* seconds after :meth:`start` (sans-IO: the
    clock and the last resort are injected)."""

    def __init__(self, clock, last_resort):
        self.clock, self.last_resort = clock, last_resort
        self._call = None
        self.fired = False

    def start(self, timeout: float, margin: float = STOP_MARGIN) -> None:
        """The stop begins now (once; a second call changes nothing)."""
        if self._call is not None or self.fired:
            return
        self.bound = timeout + margin
        self._call = self.clock.callLater(self.bound, self._expired)

    def cancel(self) -> None:
        """The stop completed."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _expired(self) -> None:
        self._call = None
        self.fired = True
        log.critical("shutdown did not finish within {bound}s; resetting what is left and exiting now",
                     bound=self.bound, event="shutdown_forced")
        self.last_resort()


class Signals:
    def __init__(self, reactor, last_resort=None):
        self.reactor = reactor
        self._old: dict[int, object] = {}
        self.watchdog = StopWatchdog(reactor, last_resort or (lambda: force_exit(reactor)))

    def bound_stop(self, timeout: float) -> None:
        """A stop begins: end the process if it takes longer than *timeout*
        plus :data:`STOP_MARGIN` (see the module doc)."""
        self.watchdog.start(timeout)

    def install(self, number: int, action) -> None:
        """Run *action* in the reactor thread on signal *number*."""
        def handler(signum, frame):
            self.reactor.callFromThread(action)

        self._old.setdefault(number, signal.getsignal(number))
        signal.signal(number, handler)

    def install_stop(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.install(number, lambda n=number: self._stop(n))

    def _stop(self, number: int) -> None:
        name = signal.Signals(number).name
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            log.info("received {signal} while already shutting down", signal=name)
        else:
            log.info("received {signal}, shutting down", signal=name)

    def restore(self) -> None:
        """The stop completed: the old handlers back, the watchdog off."""
        self.watchdog.cancel()
        for number, old in self._old.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)
        self._old.clear()
